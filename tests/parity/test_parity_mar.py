"""MAR parity against outputs of the reference code itself (LTH14/mar fe470ac; tests/fixtures/make_reference_fixtures.py).

The reference-layout checkpoint is read through contgen's importer (``load_reference_mar``), so a naming
divergence fails here as a key error and a maths divergence as a value mismatch.

Tolerance: both sides run fp32 on the CPU with the same weights, inputs and random numbers; they may differ only
in the order of floating-point operations (SDPA vs timm attention, gather vs ``nonzero``, fused vs split
elementwise terms). Measured on the machine that made the fixtures (torch 2.14 CPU): every MAR output here is
bit-identical, the largest difference anywhere in tests/parity is 1.4e-6 (KL-16 decode, values O(1)) and energy
losses differ by 1-2 ulp. ``TOL`` = 1e-5 abs + rel allows other BLAS kernels (a different blocking changes a
sum by a few ulp per layer) and is still three orders below any real divergence: a wrong name, layer, schedule
or formula moves these outputs by >= 1e-3 (e.g. the last linear-CFG scale or one respaced step).
"""

import pytest
import torch

from contgen.backbones import MARBackbone
from contgen.heads import DiffusionHead
from contgen.samplers.schedules import cosine_mask_schedule
from contgen.utils.reference_ckpt import load_reference_mar
from tests.parity.replay import FIXTURES, TOL, Replay, check_backbone_case, check_sampling_run, load

OUT = load("mar_outputs.pt")
C = OUT["config"]
L = (C["img_size"] // C["vae_stride"] // C["patch_size"]) ** 2
D = C["vae_embed_dim"] * C["patch_size"] ** 2


pytestmark = pytest.mark.usefixtures("one_thread")


def build(use_ema: bool = True, **head_kw):
    bb = MARBackbone(L, D, C["class_num"], C["encoder_embed_dim"], C["encoder_depth"], C["encoder_num_heads"],
                     C["decoder_embed_dim"], C["decoder_depth"], C["decoder_num_heads"], C["mlp_ratio"],
                     buffer_size=C["buffer_size"])
    head = DiffusionHead(D, bb.cond_dim, width=C["diffloss_w"], depth=C["diffloss_d"],
                         num_sampling_steps=int(C["num_sampling_steps"]), batch_mul=C["diffusion_batch_mul"],
                         clip_denoised=None, **head_kw)
    load_reference_mar(str(FIXTURES / "mar_ckpt.pth"), bb, head, use_ema=use_ema)
    return bb.eval(), head.eval()


@pytest.fixture(scope="module")
def model():
    return build()


def test_raw_and_ema_weights_are_the_files(model):
    ckpt = torch.load(FIXTURES / "mar_ckpt.pth", weights_only=True)
    for use_ema, key in ((True, "model_ema"), (False, "model")):
        bb, head = model if use_ema else build(use_ema=False)
        mine = {**bb.state_dict(), **{f"diffloss.{k}": v for k, v in head.state_dict().items()}}
        assert mine.keys() == ckpt[key].keys()
        assert all(torch.equal(mine[k], ckpt[key][k]) for k in mine)


@pytest.mark.parametrize("case", range(len(OUT["backbone"]["cases"])))
def test_backbone_condition(model, case):
    check_backbone_case(model[0], OUT["backbone"], case)


def test_head_network(model):
    _, head = model
    f = OUT["head_net"]
    with torch.no_grad():
        out = head.net(f["x"], f["t"], f["c"])
    assert out.abs().mean() > 0.1  # the perturbed zero-init layers make the output non-trivial
    torch.testing.assert_close(out, f["out"], **TOL)


def test_per_row_training_losses(model):
    """IDDPM hybrid loss per row for given t (t = 0 included: the discretized-NLL branch) and noise."""
    _, head = model
    f = OUT["train_losses"]
    d = head.train_diffusion
    with torch.no_grad():
        x_t = d.q_sample(f["x0"], f["t"], f["noise"])
        mse, vb = d.loss_terms(head.net(x_t, f["t"], f["c"]), f["x0"], x_t, f["t"], f["noise"])
    torch.testing.assert_close(mse, f["mse"], **TOL)
    torch.testing.assert_close(vb, f["vb"], **TOL)
    torch.testing.assert_close(mse + vb, f["loss"], **TOL)


def test_head_loss_with_the_reference_draws(model):
    """DiffusionHead.loss (rows tiled batch_mul times, masked mean) = the reference's forward_loss with its t/noise."""
    _, head = model
    f = OUT["diffloss_forward"]
    draws = [("randint" if t == "randint" else "randn", v) for t, v in zip(f["draws"]["tags"], f["draws"]["values"])]
    with Replay(draws) as r, torch.no_grad():
        loss = head.loss(f["target"].reshape(-1, D), f["z"].reshape(-1, f["z"].shape[-1]), f["mask"].reshape(-1))
    r.done()
    torch.testing.assert_close(loss, f["loss"], **TOL)


RUNS = OUT["sampling"]


@pytest.mark.parametrize("i", range(len(RUNS)), ids=[f"cfg{r['cfg']}-{r['cfg_schedule']}-T{r['temperature']}"
                                                     for r in RUNS])
def test_sampling_run(model, i):
    """A whole sample_tokens run, with the reference's own random draws replayed (tests/parity/replay.py)."""
    run = RUNS[i]
    # tokens per step of the run = contgen's cosine schedule
    schedule = cosine_mask_schedule(L, run["num_iter"])
    per_step = [c["rows"] // (2 if run["cfg"] != 1.0 else 1) // run["labels"].shape[0] for c in run["head_calls"]]
    assert per_step == [a - b for a, b in zip([L, *schedule[:-1]], schedule)]
    check_sampling_run(*model, run, L, "mar")
