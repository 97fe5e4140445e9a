"""Tokenizers: patch layout, exact inverses, KL posterior sampling, checkpoint loading (CPU, fast)."""

import math

import pytest
import torch

from contgen.tokenizers import KLTokenizer, PatchTokenizer, patchify, unpatchify

SMALL = dict(embed_dim=4, ch_mult=(1, 2), ch=32, num_res_blocks=1, attn_resolutions_enc=(16,), image_size=32)


def small_kl(**kw) -> KLTokenizer:
    torch.manual_seed(0)
    return KLTokenizer(None, random_init=True, **{**SMALL, **kw})


def images(b=2, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, size, size, generator=g) * 2 - 1


# ---------------------------------------------------------------- patchify / patch tokenizer


@pytest.mark.parametrize("p", [1, 2, 4])
def test_patchify_unpatchify_inverse_and_mar_layout(p):
    x = torch.randn(2, 5, 8, 12)
    t = patchify(x, p)
    assert t.shape == (2, (8 // p) * (12 // p), 5 * p * p)
    assert torch.equal(unpatchify(t, p, (8 // p, 12 // p)), x)
    # MAR layout: row-major grid, token = (c, p_row, p_col) flattened channel-major.
    assert torch.equal(t[1, 1], x[1, :, :p, p : 2 * p].reshape(-1))
    assert torch.equal(t[0, 12 // p], x[0, :, p : 2 * p, :p].reshape(-1))


def test_patchify_rejects_indivisible():
    with pytest.raises(ValueError, match="patch size"):
        patchify(torch.zeros(1, 3, 10, 10), 4)


def test_patch_tokenizer_exact_inverse():
    tok = PatchTokenizer(image_size=32, patch_size=4)
    assert (tok.token_dim, tok.moment_dim, tok.grid, tok.seq_len) == (48, 48, (8, 8), 64)
    x = images()
    z = tok.encode(x, generator=torch.Generator().manual_seed(1))
    assert z.shape == (2, 64, 48)
    assert torch.equal(tok.decode(z), x)  # bit-exact


def test_patch_tokenizer_validates():
    with pytest.raises(ValueError, match="tokenizer.image_size"):
        PatchTokenizer(image_size=30, patch_size=4)
    with pytest.raises(ValueError, match="tokenizer.image_size"):
        PatchTokenizer(image_size=32, patch_size=4).moments(images(size=16))


def test_frozen_and_stays_in_eval():
    for tok in (PatchTokenizer(32, 2), small_kl()):
        tok.train()
        assert not tok.training and not any(m.training for m in tok.modules())
        assert not any(p.requires_grad for p in tok.parameters())


# ---------------------------------------------------------------- KL tokenizer (small config)


@pytest.mark.parametrize("p", [1, 2])
def test_kl_shapes_and_moment_layout(p):
    tok = small_kl(patch_size=p)
    grid = 32 // 2 // p
    assert tok.grid == (grid, grid) and tok.seq_len == grid * grid
    assert tok.token_dim == 4 * p * p and tok.moment_dim == 2 * tok.token_dim
    x = images()
    m = tok.moments(x)
    assert m.shape == (2, tok.seq_len, tok.moment_dim) and m.dtype == torch.float32
    # mean and logvar channels stay separable: [patchify(mean) | patchify(logvar)].
    mean, logvar = tok.quant_conv(tok.encoder(x)).chunk(2, dim=1)
    torch.testing.assert_close(m, torch.cat([patchify(mean, p), patchify(logvar.clamp(-30, 20), p)], -1))
    z = tok.encode(x, generator=torch.Generator().manual_seed(0))
    assert z.shape == (2, tok.seq_len, tok.token_dim)
    assert tok.decode(z).shape == (2, 3, 32, 32)


def test_kl_sample_statistics():
    tok = small_kl()
    n, d = 4000, 4
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(1, 3, d, generator=g)
    logvar = torch.tensor([-40.0, -2.0, 0.0, 1.5]).expand(1, 3, d)  # -40 exercises the clamp at -30
    moments = torch.cat([mean, logvar], -1).expand(n, 3, 2 * d)
    z = tok.sample(moments, generator=torch.Generator().manual_seed(1))
    mu = mean[0] * tok.scale_factor
    sd = torch.exp(0.5 * logvar[0].clamp(-30, 20)) * tok.scale_factor
    # 5-sigma bounds per element (12 elements): sample mean SE = sd/sqrt(n); sample std relative SE ~ 1/sqrt(2n).
    assert ((z.mean(0) - mu).abs() <= 5 * sd / math.sqrt(n) + 1e-7).all()
    assert ((z.std(0) / sd - 1).abs() <= 5 / math.sqrt(2 * n)).all()


def test_kl_generator_determinism():
    tok = small_kl()
    x = images()
    a = tok.encode(x, generator=torch.Generator().manual_seed(3))
    b = tok.encode(x, generator=torch.Generator().manual_seed(3))
    c = tok.encode(x, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_kl_bf16_autocast_encode_decode():
    tok = small_kl()
    x = images()
    ref = tok.moments(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m = tok.moments(x)
        z = tok.encode(x, generator=torch.Generator().manual_seed(0))
        y = tok.decode(z)
    assert m.dtype == z.dtype == torch.float32 and torch.isfinite(z).all() and torch.isfinite(y).all()
    assert y.shape == (2, 3, 32, 32)
    # bf16 has an 8-bit mantissa: agree with fp32 to a few percent of the moment scale.
    assert (m - ref).abs().max() < 0.05 * ref.abs().max()


def test_kl_validates_config():
    with pytest.raises(ValueError, match="tokenizer.image_size"):
        small_kl(image_size=33)
    with pytest.raises(ValueError, match="tokenizer.image_size"):
        small_kl(image_size=32, patch_size=3)
    with pytest.raises(ValueError, match="tokenizer.ckpt_path"):
        KLTokenizer(None, **SMALL)


# ---------------------------------------------------------------- checkpoint loading


def test_missing_checkpoint_file(tmp_path):
    path = str(tmp_path / "nope" / "kl16.ckpt")
    with pytest.raises(FileNotFoundError, match="tokenizer.ckpt_path") as e:
        KLTokenizer(path, **SMALL)
    assert path in str(e.value) and "kl16.ckpt" in str(e.value) and "LTH14/mar" in str(e.value)


@pytest.mark.parametrize("wrap", ["model", "state_dict", None])
def test_small_checkpoint_roundtrip_ignores_loss_keys(tmp_path, wrap):
    src = small_kl()
    sd = dict(src.state_dict())
    sd["loss.discriminator.main.0.weight"] = torch.zeros(3)  # LDM training-only keys are ignored
    path = tmp_path / "vae.ckpt"
    torch.save({wrap: sd} if wrap else sd, path)
    torch.manual_seed(1)
    dst = KLTokenizer(str(path), **SMALL)
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k


@pytest.mark.parametrize("edit, needle", [
    ("drop", "missing decoder.conv_out.bias"),
    ("extra", "unexpected encoder.bogus.weight"),
    ("shape", "shape quant_conv.weight"),
])
def test_bad_checkpoint_raises_clear_error(tmp_path, edit, needle):
    sd = dict(small_kl().state_dict())
    if edit == "drop":
        del sd["decoder.conv_out.bias"]
    elif edit == "extra":
        sd["encoder.bogus.weight"] = torch.zeros(1)
    else:
        sd["quant_conv.weight"] = torch.zeros(8, 8, 3, 3)
    path = tmp_path / "bad.ckpt"
    torch.save({"model": sd}, path)
    with pytest.raises(ValueError, match="tokenizer.ckpt_path") as e:
        KLTokenizer(str(path), **SMALL)
    assert needle in str(e.value)


# Full-size kl16 names and shapes against the reference VAE itself, and encode/decode values: tests/parity/.
