"""Respaced DDPM posteriors and the KL-16 VAE against outputs of the reference code itself
(LTH14/mar fe470ac; tests/fixtures/make_reference_fixtures.py).

Tolerance ``TOL`` (1e-5 abs + rel): fp32 on both sides. The diffusion coefficients are float64 arrays rounded to
fp32 on both sides (the reference in ``_extract_into_tensor``); the VAE differs only in the order of operations
(SDPA vs explicit softmax attention). See tests/parity/test_parity_mar.py for the reasoning.
"""

import pytest
import torch

from contgen.heads import DiffusionHead
from contgen.tokenizers.base import patchify
from contgen.tokenizers.kl16 import KLTokenizer
from tests.parity.replay import FIXTURES, TOL, load

DIFF = load("diffusion_outputs.pt")
VAE = load("kl16_outputs.pt")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("count", sorted(DIFF["counts"]))
def test_posterior_mean_and_log_variance_at_respaced_steps(count):
    """p_mean_variance of create_diffusion(str(count)) (SpacedDiffusion, learned range, no clipping)."""
    f = DIFF["counts"][count]
    d = DiffusionHead(16, 8, width=8, depth=1, num_sampling_steps=count).sample_diffusion
    assert d.timesteps.tolist() == f["timestep_map"].tolist()
    torch.testing.assert_close(d.timesteps[f["t"]], f["model_t"], rtol=0, atol=0)  # the net sees original steps
    eps, v = f["model_out"].chunk(2, dim=-1)
    for step in f["t"].unique().tolist():
        rows = f["t"] == step
        mean, log_var = d.p_mean_variance(eps[rows], v[rows], f["x"][rows], step)
        torch.testing.assert_close(mean, f["mean"][rows], **TOL)
        torch.testing.assert_close(log_var, f["log_variance"][rows], **TOL)


def kl16(patch_size: int = 1) -> KLTokenizer:
    c = VAE["config"]
    return KLTokenizer(str(FIXTURES / "kl16_small.pth"), embed_dim=c["embed_dim"], ch_mult=c["ch_mult"], ch=c["ch"],
                       num_res_blocks=c["num_res_blocks"], attn_resolutions_enc=c["attn_resolutions"],
                       image_size=c["resolution"], patch_size=patch_size)


@pytest.mark.parametrize("p", [1, 2])
def test_kl16_encode(p):
    """moments = [posterior mean | clamped log-variance], patchified as MAR does."""
    with torch.no_grad():
        m = kl16(p).moments(VAE["images"])
    mean, logvar = m.chunk(2, dim=-1)
    assert VAE["mean"].abs().mean() > 0.05
    torch.testing.assert_close(mean, patchify(VAE["mean"], p), **TOL)
    torch.testing.assert_close(logvar, patchify(VAE["logvar"], p), **TOL)


def test_kl16_decode():
    tok = kl16()
    with torch.no_grad():
        img = tok.decoder(tok.post_quant_conv(VAE["latents"]))  # raw latents: no scale factor involved
        # tokens as MAR samples them: decode divides by the 0.2325 scale as engine_mar.py does
        decoded = [tok.decode(r["tokens"]) for r in load("mar_outputs.pt")["sampling"]]
    torch.testing.assert_close(img, VAE["decoded"], **TOL)
    for mine, ref in zip(decoded, VAE["mar_run_decoded"]):
        torch.testing.assert_close(mine, ref, **TOL)
