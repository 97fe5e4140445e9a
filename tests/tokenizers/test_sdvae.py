"""SD-VAE tokenizer: a diffusers-format folder loads into the LDM autoencoder of kl16.py and matches diffusers
and the reference UCGM pipeline (tests/fixtures/make_sdvae_fixture.py: UCGM ae74912 + diffusers 0.42.1).

Tolerance ``TOL`` (1e-5 abs + rel): both sides run the same fp32 convolutions and GroupNorms on the same weights;
they differ only in the order of operations of the mid attention (SDPA vs diffusers' baddbmm + fp32 softmax,
linear vs 1x1 conv, SDPA vs diffusers' attention processor), i.e. by fp32 rounding of O(1) activations.
Measured max abs differences: posterior mean/std 3.6e-7/4.8e-7 (values up to 2.2), tokens 3.0e-7, statistics
3.0e-8, decoded images 4.4e-6 (values up to 3.0; the random decoder amplifies rounding). A wrong key mapping, a
missed reshape or a wrong scaling moves them by O(0.1-1).
"""

import json
import shutil
from pathlib import Path

import pytest
import torch

from contgen.tokenizers.base import patchify, unpatchify
from contgen.tokenizers.sdvae import (SDVAETokenizer, compute_latent_stats, diffusers_names, load_latent_stats,
                                      read_safetensors)

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "reference" / "sdvae"
TINY = FIX / "tiny"
REF = torch.load(FIX / "outputs.pt", weights_only=True)
LAYOUT = json.loads((FIX / "sd_vae_layout.json").read_text())
ARCH = dict(image_size=32, block_out_channels=(8, 8, 16), layers_per_block=2, norm_num_groups=4)
TOL = dict(rtol=1e-5, atol=1e-5)

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**kw) -> SDVAETokenizer:
    return SDVAETokenizer(str(TINY), **{**ARCH, **kw})


def views(key: str) -> torch.Tensor:
    """The images behind the reference data-set items: its per-item choice of latents / latents_flip."""
    x = REF["images"]
    return torch.where(REF[key][:, None, None, None], x.flip(-1), x)


# ---------------------------------------------------------------- parity with diffusers / UCGM


def test_posterior_matches_diffusers():
    tok = tiny()
    assert (tok.grid, tok.token_dim, tok.moment_dim, tok.scale_factor) == ((8, 8), 4, 8, 0.18215)
    m = tok.moments(REF["images"])
    mean, logvar = (unpatchify(t, 1, tok.grid) for t in m.chunk(2, dim=-1))
    torch.testing.assert_close(mean, REF["posterior_mean"], **TOL)  # latent_dist.mean
    torch.testing.assert_close(torch.exp(0.5 * logvar), REF["posterior_std"], **TOL)  # latent_dist.std
    torch.testing.assert_close(mean, REF["latents"], **TOL)  # SD_VAE.encode_images (sdvae.py:94)
    flip_mean, _ = tok.latent_moments(REF["images"].flip(-1))
    torch.testing.assert_close(flip_mean, REF["latents_flip"], **TOL)


def test_tokens_match_reference_dataset_without_latent_norm():
    """latent_norm False, latent_multiplier 0.18215 (every SD-VAE config): tokens = posterior mean x 0.18215."""
    tok = tiny()
    tokens = tok.encode(views("views_norm_off"))
    torch.testing.assert_close(unpatchify(tokens, 1, tok.grid), REF["features_norm_off"], **TOL)
    # posterior="mean" draws nothing: the generator is irrelevant
    assert torch.equal(tokens, tok.encode(views("views_norm_off"), generator=torch.Generator().manual_seed(5)))


def test_latent_stats_match_reference_and_normalised_tokens(tmp_path):
    tok = tiny()
    stats = compute_latent_stats(tok, [REF["images"][:3], {"image": REF["images"][3:]}], num_images=4)
    assert stats["mean"].shape == stats["std"].shape == (1, 4, 1, 1)
    torch.testing.assert_close(stats["mean"], REF["stats_mean"], **TOL)  # dataset.py compute_latent_stats
    torch.testing.assert_close(stats["std"], REF["stats_std"], **TOL)
    # num_images stops the stream (12 images offered, the first 4 used)
    torch.testing.assert_close(compute_latent_stats(tok, [REF["images"]] * 3, num_images=4)["std"], stats["std"],
                               **TOL)
    path = tmp_path / "sdvae_f8c4_32.pt"
    torch.save({"mean": REF["stats_mean"], "std": REF["stats_std"]}, path)  # the reference cache file format
    normed = tiny(latent_stats=str(path))
    tokens = normed.encode(views("views_norm_on"))
    torch.testing.assert_close(unpatchify(tokens, 1, normed.grid), REF["features_norm_on"], **TOL)
    torch.testing.assert_close(normed.decode(patchify(REF["features_norm_on"][:2], 1)), REF["decode_raw_norm_on"],
                               **TOL)


def test_decode_matches_reference():
    tok = tiny()
    y = tok.decode(patchify(REF["features_norm_off"][:2], 1))
    torch.testing.assert_close(y, REF["decode_raw_norm_off"], **TOL)  # model.decode(z / 0.18215).sample
    torch.testing.assert_close(((y + 1) / 2).clamp(0, 1), REF["decode_images_norm_off"], **TOL)  # decode_to_images


# ---------------------------------------------------------------- the real SD-VAE architecture (no weights)


def test_real_sd_vae_config_builds_with_diffusers_names_shapes_and_count(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LAYOUT["config"]))  # the sd-vae-ft-ema config.json
    with torch.device("meta"):
        tok = SDVAETokenizer(str(tmp_path), random_init=True)
    n = sum(p.numel() for p in tok.parameters())
    assert n == LAYOUT["num_params"] == 83_653_863
    assert tok.scale_factor == LAYOUT["scaling_factor"] == 0.18215  # the 2022 config.json has no scaling_factor
    assert (tok.grid, tok.token_dim, tok.seq_len) == ((32, 32), 4, 1024)
    mapped = {}
    for k, v in tok.state_dict().items():
        shape = list(v.shape)
        if ".attn_1." in k and len(shape) == 4:
            shape = shape[:2]  # LDM 1x1 conv vs diffusers Linear
        mapped[diffusers_names(k, 4)[0]] = shape
    assert mapped == LAYOUT["state_dict"]


def test_512px_grid():
    with torch.device("meta"):
        tok = SDVAETokenizer(None, image_size=512, random_init=True)
    assert (tok.grid, tok.stride) == ((64, 64), 8)


# ---------------------------------------------------------------- loading variants and errors


def test_deprecated_attention_names_and_bin_file(tmp_path):
    """diffusers < 0.14 exports (e.g. SD 2.x vae/ folders) name the mid attention query/key/value/proj_attn."""
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    sd = {}
    for k, v in read_safetensors(str(TINY / "diffusion_pytorch_model.safetensors")).items():
        for new, dep in old.items():
            k = k.replace(f".attentions.0.{new}.", f".attentions.0.{dep}.")
        sd[k] = v.clone()
    assert any(".query." in k for k in sd)
    shutil.copy(TINY / "config.json", tmp_path / "config.json")
    torch.save(sd, tmp_path / "diffusion_pytorch_model.bin")
    a, b = tiny(), SDVAETokenizer(str(tmp_path), **ARCH)
    for k, v in a.state_dict().items():
        assert torch.equal(b.state_dict()[k], v), k


def _write_safetensors(path: Path, tensors: dict) -> None:
    """Test-side writer of the format (so the reader is checked on more dtypes than the fixture's fp32)."""
    names = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64"}
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for k, t in tensors.items():
        raw = t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[k] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(len(h).to_bytes(8, "little") + h + b"".join(blobs))


def test_read_safetensors_dtypes(tmp_path):
    g = torch.Generator().manual_seed(0)
    ts = {"a": torch.randn(3, 5, generator=g), "b": torch.randn(7, generator=g).half(),
          "c": torch.randn(2, 2, generator=g).bfloat16(), "d": torch.arange(5), "e": torch.zeros(0, 3)}
    _write_safetensors(tmp_path / "x.safetensors", ts)
    back = read_safetensors(str(tmp_path / "x.safetensors"))
    assert back.keys() == ts.keys()
    for k, t in ts.items():
        assert back[k].dtype == t.dtype and torch.equal(back[k], t), k
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ValueError, match="not a safetensors file"):
        read_safetensors(str(tmp_path / "bad.safetensors"))


def test_missing_files_name_the_key_and_the_release(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.ckpt_path") as e:
        SDVAETokenizer(str(tmp_path / "nope"), variant="mse")
    assert "config.json" in str(e.value) and "stabilityai/sd-vae-ft-mse" in str(e.value)
    (tmp_path / "vae").mkdir()
    shutil.copy(TINY / "config.json", tmp_path / "vae" / "config.json")
    with pytest.raises(FileNotFoundError, match="vae/ subfolder"):
        SDVAETokenizer(str(tmp_path), **ARCH)
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors") as e:
        SDVAETokenizer(str(tmp_path / "vae"), **ARCH)
    assert "tokenizer.ckpt_path" in str(e.value) and "stabilityai/sd-vae-ft-ema" in str(e.value)
    with pytest.raises(ValueError, match="tokenizer.ckpt_path is required"):
        SDVAETokenizer(None)
    with pytest.raises(FileNotFoundError, match="tokenizer.latent_stats"):
        tiny(latent_stats=str(tmp_path / "stats.pt"))


def test_config_mismatch_is_refused(tmp_path):
    with pytest.raises(ValueError, match="block_out_channels: config.json has \\[8, 8, 16\\], tokenizer"):
        SDVAETokenizer(str(TINY), image_size=32)  # the SD-VAE defaults against the tiny folder
    cfg = json.loads((TINY / "config.json").read_text())
    for key, value in (("latent_channels", 16), ("mid_block_add_attention", False),
                       ("up_block_types", ["UpDecoderBlock2D"] * 2), ("shift_factor", 0.0609)):
        (tmp_path / "config.json").write_text(json.dumps({**cfg, key: value}))
        with pytest.raises(ValueError, match=f"{key}: config.json has"):
            SDVAETokenizer(str(tmp_path), **ARCH, random_init=True)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "scaling_factor": 0.13025}))  # SDXL's VAE
    with pytest.raises(ValueError, match="tokenizer.scale_factor=0.18215 differs"):
        SDVAETokenizer(str(tmp_path), **ARCH, random_init=True)
    assert SDVAETokenizer(str(tmp_path), **ARCH, scale_factor=None, random_init=True).scale_factor == 0.13025


@pytest.mark.parametrize("edit, needle", [
    ("drop", "missing decoder.up_blocks.0.upsamplers.0.conv.bias"),
    ("extra", "unexpected encoder.bogus.weight"),
    ("shape", "shape quant_conv.weight"),
    ("both", "both ['encoder.mid_block.attentions.0.to_q.weight', 'encoder.mid_block.attentions.0.query.weight']"),
])
def test_bad_weights_are_refused(tmp_path, edit, needle):
    sd = dict(read_safetensors(str(TINY / "diffusion_pytorch_model.safetensors")))
    if edit == "drop":
        del sd["decoder.up_blocks.0.upsamplers.0.conv.bias"]
    elif edit == "extra":
        sd["encoder.bogus.weight"] = torch.zeros(1)
    elif edit == "shape":
        sd["quant_conv.weight"] = torch.zeros(8, 8, 3, 3)
    else:
        sd["encoder.mid_block.attentions.0.query.weight"] = sd["encoder.mid_block.attentions.0.to_q.weight"]
    shutil.copy(TINY / "config.json", tmp_path / "config.json")
    torch.save(sd, tmp_path / "diffusion_pytorch_model.bin")
    with pytest.raises(ValueError, match="tokenizer.ckpt_path") as e:
        SDVAETokenizer(str(tmp_path), **ARCH)
    assert needle in str(e.value)


def test_validates_options():
    for kw, needle in ((dict(variant="xl"), "tokenizer.variant"), (dict(posterior="mode"), "tokenizer.posterior"),
                       (dict(image_size=34), "tokenizer.image_size"), (dict(patch_size=3), "tokenizer.image_size"),
                       (dict(block_out_channels=(8, 12, 16)), "tokenizer.block_out_channels")):
        with pytest.raises(ValueError, match=needle):
            SDVAETokenizer(None, random_init=True, **{**ARCH, **kw})


# ---------------------------------------------------------------- tokenizer behaviour


def test_patch_layout_and_stats_broadcast(tmp_path):
    torch.save({"mean": torch.tensor([0.1, -0.2, 0.3, 0.0]), "std": torch.tensor([0.5, 2.0, 1.0, 0.25])},
               tmp_path / "s.pt")
    one, two = tiny(latent_stats=str(tmp_path / "s.pt")), tiny(latent_stats=str(tmp_path / "s.pt"), patch_size=2)
    assert (two.grid, two.token_dim, two.moment_dim) == ((4, 4), 16, 32)
    x = REF["images"][:2]
    z1, z2 = one.encode(x), two.encode(x)
    # same numbers, only regrouped: channel-major 2x2 patches with each feature normalised by its own channel
    assert torch.equal(patchify(unpatchify(z1, 1, one.grid), 2), z2)
    # same latent after unpatchify, but a different memory layout into the convolutions: fp32 rounding only
    torch.testing.assert_close(two.decode(z2), one.decode(z1), **TOL)


def test_posterior_sample_draws_with_the_generator():
    tok = tiny(posterior="sample")
    m = tok.moments(REF["images"][:2])
    a = tok.sample(m, generator=torch.Generator().manual_seed(3))
    b = tok.sample(m, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not torch.equal(a, tok.sample(m, generator=torch.Generator().manual_seed(4)))
    mean, logvar = m.chunk(2, dim=-1)
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, (mean + torch.exp(0.5 * logvar) * eps) * 0.18215, rtol=0, atol=0)


def test_bf16_autocast_and_frozen():
    tok = tiny()
    tok.train()
    assert not any(m.training for m in tok.modules()) and not any(p.requires_grad for p in tok.parameters())
    assert not any("latent_" in k for k in tok.state_dict())  # stats are rebuilt from tokenizer.latent_stats
    x = REF["images"][:2]
    ref = tok.moments(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m = tok.moments(x)
        y = tok.decode(tok.sample(m))
    assert m.dtype == torch.float32 and torch.isfinite(y).all() and y.shape == x.shape
    # bf16 has an 8-bit mantissa: agree with fp32 to a few percent of the moment scale
    assert (m - ref).abs().max() < 0.05 * ref.abs().max()


def test_load_latent_stats_checks(tmp_path):
    torch.save({"mean": torch.zeros(1, 4, 1, 1), "std": torch.ones(1, 4, 1, 1)}, tmp_path / "ok.pt")
    mean, std = load_latent_stats(str(tmp_path / "ok.pt"), 4)
    assert mean.shape == std.shape == (4,)
    for bad, needle in (({"mean": torch.zeros(3), "std": torch.ones(3)}, "4 latent channels"),
                        ({"mean": torch.zeros(4), "std": torch.zeros(4)}, "std finite and > 0"),
                        ({"mean": torch.zeros(4)}, "'mean' and 'std'")):
        torch.save(bad, tmp_path / "bad.pt")
        with pytest.raises(ValueError, match=needle):
            load_latent_stats(str(tmp_path / "bad.pt"), 4)
