"""EAR parity against outputs of the reference code itself (shaochenze/EAR 9256a9f;
tests/fixtures/make_reference_fixtures.py). The ``scoreloss.*`` checkpoint goes through contgen's importer.

Tolerance ``TOL`` (1e-5 abs + rel): same reasoning as tests/parity/test_parity_mar.py — fp32 on both sides, only the
order of operations differs (e.g. the reference's ``linalg.norm`` vs contgen's sum of squares + 1e-20 under the
sqrt, masked mean as ``(l·m).sum()/m.sum()`` vs normalised weights), each worth a few fp32 roundings.
"""

import pytest
import torch

from contgen.backbones import EARBackbone
from contgen.heads import EnergyHead
from contgen.heads.energy import energy_score_loss
from contgen.utils.reference_ckpt import load_reference_mar
from tests.parity.replay import FIXTURES, TOL, Replay, check_backbone_case, check_sampling_run, load

OUT = load("ear_outputs.pt")
C = OUT["config"]
L = (C["img_size"] // C["vae_stride"] // C["patch_size"]) ** 2
D = C["vae_embed_dim"] * C["patch_size"] ** 2


pytestmark = pytest.mark.usefixtures("one_thread")


def build(alpha: float = C["alpha"], train_temperature: float = C["train_temperature"]):
    bb = EARBackbone(L, D, C["class_num"], C["decoder_embed_dim"], C["decoder_depth"], C["decoder_num_heads"],
                     C["mlp_ratio"], buffer_size=C["buffer_size"])
    head = EnergyHead(D, bb.cond_dim, width=C["scoreloss_w"], depth=C["scoreloss_d"], noise_channels=C["noise_channels"],
                      alpha=alpha, train_temperature=train_temperature, score_batch_mul=C["score_batch_mul"],
                      num_samples=2)
    load_reference_mar(str(FIXTURES / "ear_ckpt.pth"), bb, head, use_ema=True)
    return bb.eval(), head.eval()


@pytest.fixture(scope="module")
def model():
    return build()


@pytest.mark.parametrize("case", range(len(OUT["backbone"]["cases"])))
def test_backbone_condition(model, case):
    check_backbone_case(model[0], OUT["backbone"], case)


def test_generator_output_train_and_eval(model):
    _, head = model
    f = OUT["generator"]
    net = head.net
    with torch.no_grad():
        net.train()
        train = net(f["z"], f["noise"])
        net.eval()
        cold, plain = net(f["z"], f["noise"], 0.7), net(f["z"], f["noise"], 1.0)
    assert (f["train"] - f["eval_0.7"]).abs().max() > 1e-3  # infer_temperature matters on these weights
    torch.testing.assert_close(train, f["train"], **TOL)
    torch.testing.assert_close(cold, f["eval_0.7"], **TOL)
    torch.testing.assert_close(plain, f["eval_1.0"], **TOL)


@pytest.mark.parametrize("i", range(len(OUT["energy_loss"]["cases"])))
def test_energy_loss_with_the_reference_noise(i):
    f = OUT["energy_loss"]
    case = f["cases"][i]
    _, head = build(case["alpha"], case["train_temperature"])
    head.train()
    target, z, mask = f["target"].reshape(-1, D), f["z"].reshape(-1, f["z"].shape[-1]), f["mask"].reshape(-1)
    noise_masked, noise_plain = case["draws"]["values"]
    with Replay([("rand", noise_masked), ("rand", noise_plain)]) as r, torch.no_grad():
        loss = head.loss(target, z, mask)
        loss_plain = head.loss(target, z)
    r.done()
    torch.testing.assert_close(loss, case["loss"], **TOL)
    torch.testing.assert_close(loss_plain, case["loss_nomask"], **TOL)
    # per row: the reference's energy_score on the same two samples
    rows, tgt = z.repeat(head.score_batch_mul, 1), target.repeat(head.score_batch_mul, 1)
    with torch.no_grad():
        samples = head.net(rows.repeat(2, 1), noise_masked - 0.5).view(2, rows.shape[0], -1)
    per_row = energy_score_loss(samples, tgt, case["alpha"], case["train_temperature"])
    torch.testing.assert_close(per_row, case["per_row"], **TOL)


RUNS = OUT["sampling"]


@pytest.mark.parametrize("i", range(len(RUNS)), ids=[f"cfg{r['cfg']}-{r['cfg_schedule']}-T{r['temperature']}"
                                                     for r in RUNS])
def test_sampling_run(model, i):
    """A whole sample_tokens run with the reference's draws replayed (mappings: tests/parity/replay.py)."""
    check_sampling_run(*model, RUNS[i], L, "ear")
