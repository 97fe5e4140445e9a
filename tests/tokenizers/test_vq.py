"""Discrete VQ tokenizers: the MaskGIT VQGAN (tokenizer=vqgan_maskgit) against DiGIT's own taming code, and the
small VQ tokenizer contgen trains itself (tokenizer=vq_small, train_vq.py). CPU, fast."""

import json
import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import contgen.cli.config  # noqa: F401
from contgen.cli.train_vq import train_vq
from contgen.data.shapes import Shapes
from contgen.heads.categorical import CategoricalHead
from contgen.modules.causal_ar import CausalARModule
from contgen.samplers.causal import CausalARSampler
from contgen.tokenizers.vq import nearest_code
from contgen.tokenizers.vq_small import VQSmallTokenizer
from contgen.tokenizers.vqgan import VQGANTokenizer
from tests.backbones.test_gpt import GPT_SMALL
from tests.helpers import train_optim

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "reference" / "vqgan"  # tests/fixtures/make_vqgan_fixture.py
SMALL = dict(image_size=16, ch=32, ch_mult=(1, 2), num_res_blocks=2, z_channels=32, n_embed=64)


def test_vqgan_layout_is_the_reference_vqmodel():
    """Every parameter name and shape of DiGIT's VQModel (config/vqgan/vqgan.yaml), i.e. vqgan_jax_strongaug.ckpt."""
    want = json.loads((FIXTURE / "layout.json").read_text())["layout"]
    with torch.device("meta"):
        tok = VQGANTokenizer(None, random_init=True)
    assert {k: list(v.shape) for k, v in tok.state_dict().items()} == want
    assert (tok.vocab_size, tok.grid, tok.token_dim) == (1024, (16, 16), 256)


def test_vqgan_matches_reference_taming_code():
    ref = torch.load(FIXTURE / "small_outputs.pt", weights_only=True)
    tok = VQGANTokenizer(str(FIXTURE / "small.pt"), **SMALL)
    img = ref["images"] * 2 - 1  # the reference sees [0, 1]; contgen's images are in [-1, 1]
    ids = tok.encode(img)
    assert ids.dtype == torch.int64 and torch.equal(ids, ref["ids"])
    torch.testing.assert_close(tok.decode(ids), ref["pixels"] * 2 - 1, atol=1e-5, rtol=0)


def test_vqgan_shapes_and_id_range():
    torch.manual_seed(0)
    tok = VQGANTokenizer(None, random_init=True, **SMALL)
    img = torch.rand(3, 3, 16, 16) * 2 - 1
    ids = tok.encode(img)
    assert ids.shape == (3, 64) and ids.dtype == torch.int64
    assert 0 <= ids.min() and ids.max() < tok.vocab_size
    out = tok.decode(ids)
    assert out.shape == img.shape and out.min() >= -1 and out.max() <= 1
    with pytest.raises(ValueError, match=r"expected ids \(B, 64\)"):
        tok.decode(ids[:, :10])


def test_nearest_code_is_the_exact_argmin_in_fp32():
    g = torch.Generator().manual_seed(0)
    z, codes = torch.randn(2, 5, 8, generator=g), torch.randn(16, 8, generator=g)
    want = torch.cdist(z.reshape(-1, 8).double(), codes.double()).argmin(1).reshape(2, 5)
    assert torch.equal(nearest_code(z, codes), want)
    assert torch.equal(nearest_code(z.bfloat16(), codes), nearest_code(z.bfloat16().float(), codes))


def test_vqgan_strict_load_errors_name_the_file_and_key(tmp_path):
    sd = torch.load(FIXTURE / "small.pt", weights_only=True)["state_dict"]
    bad = dict(sd)
    del bad["decoder.conv_out.bias"]
    bad["quant_conv.weight"] = torch.zeros(1)  # an LDM key the MaskGIT VQGAN does not have
    path = tmp_path / "bad.ckpt"
    torch.save({"state_dict": bad}, path)
    with pytest.raises(ValueError, match=r"tokenizer.ckpt_path=.*bad.ckpt.*missing decoder.conv_out.bias.*"
                                         r"unexpected quant_conv.weight"):
        VQGANTokenizer(str(path), **SMALL)
    with pytest.raises(ValueError, match=r"shape quantize.embedding.weight: checkpoint \(64, 32\) vs model \(32, 32\)"):
        VQGANTokenizer(str(FIXTURE / "small.pt"), **{**SMALL, "n_embed": 32})
    with pytest.raises(FileNotFoundError, match=r"tokenizer.ckpt_path: file not found.*vqgan_jax_strongaug.ckpt"):
        VQGANTokenizer(str(tmp_path / "none.ckpt"), **SMALL)
    with pytest.raises(ValueError, match="tokenizer.ckpt_path is required"):
        VQGANTokenizer(None, **SMALL)


def run_train_vq(out: Path, *overrides: str) -> dict:
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train_vq.yaml", overrides=[f"out={out}", "device=cpu", "threads=1", *overrides])
    return train_vq(cfg)


def test_vq_small_trains_reconstructs_and_loads(tmp_path):
    """300 steps on 16-px shapes: held-out PSNR above that of the best constant image (the held-out mean, the MSE
    bound of a decoder that ignores its codes: 11.1 dB here), more than one code used; the file loads as
    tokenizer=vq_small and reproduces the scored reconstructions."""
    m = run_train_vq(tmp_path, "steps=300", "batch_size=32", "eval_samples=96", "log_every=1000",
                     "tokenizer.vocab_size=32")
    held = torch.stack([Shapes(16, 96, split="val")[i]["image"] for i in range(96)])
    chance = 10 * math.log10(4.0 / (held - held.mean(0)).pow(2).mean().item())
    assert m["psnr"] > chance + 3, (m, chance)
    assert 1 < m["codes_used"] <= 32 and m["eval_images"] == 96
    tok = VQSmallTokenizer(str(tmp_path / "vq_small.pt"), image_size=16, vocab_size=32)
    ids = tok.encode(held)
    assert ids.shape == (96, 16) and ids.dtype == torch.int64 and ids.max() < 32
    mse = (tok.decode(ids) - held).pow(2).flatten(1).mean(1).mean().item()
    assert math.isclose(10 * math.log10(4.0 / mse), m["psnr"], rel_tol=1e-4)


def test_vq_small_checkpoint_errors_name_the_config_key(tmp_path):
    tok = VQSmallTokenizer(None, random_init=True, vocab_size=32)
    torch.save(tok.checkpoint(), tmp_path / "vq_small.pt")
    with pytest.raises(ValueError, match=r"tokenizer.vocab_size=64 but the file has 32"):
        VQSmallTokenizer(str(tmp_path / "vq_small.pt"), vocab_size=64)
    with pytest.raises(FileNotFoundError, match=r"tokenizer.ckpt_path: file not found.*train_vq.py"):
        VQSmallTokenizer(str(tmp_path / "none.pt"))
    with pytest.raises(ValueError, match=r"tokenizer.image_size=18 must be divisible by 2\*\*tokenizer.levels"):
        VQSmallTokenizer(None, image_size=18, random_init=True)


def test_train_vq_refuses_another_tokenizer(tmp_path):
    with pytest.raises(ValueError, match=r"train_vq.py trains tokenizer=vq_small"):
        run_train_vq(tmp_path, "tokenizer=patch")


def test_vq_small_plugs_into_the_causal_gpt():
    """vocab_size makes it discrete: a causal GPT + categorical head trains on its ids and generate() decodes."""
    torch.manual_seed(0)
    tok = VQSmallTokenizer(None, random_init=True, vocab_size=32)
    module = CausalARModule(tok, GPT_SMALL, CategoricalHead, CausalARSampler(), num_classes=12, optim=train_optim())
    batch = {"image": torch.stack([Shapes(16, 4)[i]["image"] for i in range(4)]), "label": torch.arange(4)}
    g, g_cpu = module.step_generators(0)
    tokens = module.tokens_from_batch(batch, g)
    assert tokens.shape == (4, 16) and tokens.dtype == torch.int64
    assert torch.isfinite(module.masked_loss(tokens, batch["label"], g, g_cpu))
    img = module.generate(torch.tensor([0, 5]), torch.Generator().manual_seed(0), use_ema=False)
    assert img.shape == (2, 3, 16, 16) and img.abs().max() <= 1
