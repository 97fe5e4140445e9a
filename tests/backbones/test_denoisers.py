"""DiT / SiT / TiT denoisers: parity with the reference code, checkpoint import, the denoiser contract, preset sizes.

Parity fixtures are made by the reference code itself (tests/fixtures/make_denoiser_fixtures.py: UCGM ae74912
networks/tit.py and sit.py, facebookresearch/DiT ed81ce2 models.py), in the reference checkpoint layouts, and
loaded here through contgen's importer. Tolerance ``TOL`` (1e-5 abs + rel): both sides run fp32 on the CPU with
the same operations (SDPA, the same GEMM shapes), and measured differences are exactly 0; the bound leaves room
for a different BLAS / SDPA kernel choice, whose reordered fp32 sums differ by a few ulps (~1e-7 relative) per
op over two blocks on outputs of size O(1) — orders of magnitude below any real mismatch (a wrong weight, sign,
channel order or time scale moves outputs by > 1e-2, see ``test_fixture_outputs_are_sensitive``).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from contgen.backbones.dit import DiT, SiT, count_parameters
from contgen.backbones.tit import TiT
from contgen.utils.denoiser_ckpt import infer_denoiser_kwargs, load_denoiser, read_denoiser_state
from tests.helpers import ROOT

pytestmark = pytest.mark.usefixtures("one_thread")

FIX = Path(ROOT) / "tests" / "fixtures" / "reference" / "denoisers"
TOL = dict(rtol=1e-5, atol=1e-5)  # why: module docstring
CASES = {"tit": (TiT, "tit_ucgm.pt"), "tit_variant": (TiT, "tit_variant.pt"), "sit": (SiT, "sit_repa.pt"),
         "dit": (DiT, "dit_release.pt")}


@pytest.fixture(scope="module")
def outputs():
    return torch.load(FIX / "outputs.pt", weights_only=True)


def build(name: str, outputs, **over):
    """contgen's network for a fixture: the reference kwargs, minus DiT's class_dropout_prob (the null row is
    always there in contgen, which is what the reference's 0.1 gives)."""
    kw = {k: v for k, v in outputs[name]["kwargs"].items() if k != "class_dropout_prob"}
    kw.update(over)
    return CASES[name][0](kw.pop("input_size"), kw.pop("in_channels"), kw.pop("num_classes"), **kw).eval()


def native_time(name: str, t: torch.Tensor) -> torch.Tensor:
    """The reference DiT was fed DDPM steps; contgen's DiT (time_scale 1000) takes step / 1000."""
    return t / 1000 if name == "dit" else t


# --------------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("name", sorted(CASES))
def test_reference_parity(name, outputs):
    io = outputs[name]
    net = build(name, outputs)
    report = load_denoiser(str(FIX / CASES[name][1]), net)
    assert report["source"] == ("ema" if name == "tit" else "state_dict")
    with torch.no_grad():
        out = net(io["x"], native_time(name, io["t"]), io["y"], full_output=True)
        first = net(io["x"], native_time(name, io["t"]), io["y"])
    torch.testing.assert_close(out, io["out"], **TOL)
    c = io["x"].shape[1]
    assert first.shape == io["x"].shape  # the contract: F has x's shape; DiT's variance half is full_output only
    torch.testing.assert_close(first, io["out"][:, :c], **TOL)


def test_dit_raw_steps_with_time_scale_one(outputs):
    """time_scale=1 takes the reference's raw DDPM steps: the same numbers as t = step / 1000 at time_scale 1000."""
    io = outputs["dit"]
    net = build("dit", outputs, time_scale=1.0)
    load_denoiser(str(FIX / CASES["dit"][1]), net)
    with torch.no_grad():
        torch.testing.assert_close(net(io["x"], io["t"], io["y"], full_output=True), io["out"], **TOL)


@pytest.mark.parametrize("name", sorted(CASES))
def test_own_init_matches_reference_constants(name, outputs):
    """pos_embed (2-D sin-cos) and TiT's RoPE tables were left unperturbed in the fixtures: contgen's own init must
    reproduce the reference's values (float32; the float64 sin/cos are rounded once on both sides)."""
    state, _ = read_denoiser_state(str(FIX / CASES[name][1]))
    own = build(name, outputs).state_dict()
    keys = [k for k in ("pos_embed", "feat_rope.freqs_cos", "feat_rope.freqs_sin") if k in own]
    assert keys == (["pos_embed", "feat_rope.freqs_cos", "feat_rope.freqs_sin"] if name.startswith("tit")
                    else ["pos_embed"])
    for k in keys:
        torch.testing.assert_close(own[k], state[k], rtol=0, atol=1e-7)


@pytest.mark.parametrize("name", sorted(CASES))
def test_fixture_outputs_are_sensitive(name, outputs):
    """The fixtures exercise every part: changing t, the labels, or zeroing the blocks' adaLN moves the reference
    output by far more than TOL (so the parity test would catch a wrong time scale, null row or block)."""
    io = outputs[name]
    net = build(name, outputs)
    load_denoiser(str(FIX / CASES[name][1]), net)
    t = native_time(name, io["t"])
    with torch.no_grad():
        base = net(io["x"], t, io["y"])
        assert (net(io["x"], t.flip(0), io["y"]) - base).abs().max() > 1e-2
        assert (net(io["x"], t, torch.full_like(io["y"], 10)) - base).abs().max() > 1e-2
        for block in net.blocks:
            block.adaLN_modulation[-1].weight.zero_()
            block.adaLN_modulation[-1].bias.zero_()
        assert (net(io["x"], t, io["y"]) - base).abs().max() > 1e-1


# --------------------------------------------------------------------------------------------------- importer


def test_use_ema_picks_the_entry(outputs):
    """UCGM checkpoints hold {"model", "ema"}; the fixture's "model" differs in final_layer.linear.weight."""
    net = build("tit", outputs)
    assert load_denoiser(str(FIX / "tit_ucgm.pt"), net, use_ema=False)["source"] == "model"
    io = outputs["tit"]
    with torch.no_grad():
        assert (net(io["x"], io["t"], io["y"]) - io["out"]).abs().max() > 1e-2


def test_repa_projectors_dropped_and_reported(outputs):
    net = build("sit", outputs)
    report = load_denoiser(str(FIX / "sit_repa.pt"), net)
    assert report["dropped"] == sorted(f"projectors.0.{i}.{p}" for i in (0, 2, 4) for p in ("bias", "weight"))
    with pytest.raises(ValueError, match=r"(?s)sit_repa\.pt does not match.*unexpected keys \(6\): projectors\.0\.0"):
        load_denoiser(str(FIX / "sit_repa.pt"), build("sit", outputs), drop_prefixes=())


def test_strict_errors_name_keys_file_and_config(outputs):
    path = str(FIX / "dit_release.pt")
    with pytest.raises(ValueError, match=r"(?s)y_embedder\.embedding_table\.weight: file \(11, 32\) vs model "
                                         r"\(13, 32\).*set num_classes=10"):
        load_denoiser(path, build("dit", outputs, num_classes=12))
    with pytest.raises(ValueError, match=r"(?s)final_layer\.linear\.weight: file \(128, 32\) vs model \(64, 32\).*"
                                         r"learn_sigma=True"):
        load_denoiser(path, build("dit", outputs, learn_sigma=False))
    with pytest.raises(ValueError, match=r"(?s)dit_release\.pt does not match TiT.*missing keys.*blocks\.0\.mlp\.w12"
                                         r".*unexpected keys.*blocks\.0\.mlp\.fc1.*family=dit"):
        load_denoiser(path, TiT(8, 4, 10, patch_size=4, hidden_size=32, depth=2, num_heads=2))
    with pytest.raises(ValueError, match="file not found: .*nope.pt"):
        load_denoiser(str(FIX / "nope.pt"), build("dit", outputs))


def test_pickled_training_checkpoint(tmp_path, outputs):
    """DiT / REPA train.py save an argparse.Namespace under 'args': refused by default with a clear way out."""
    state, _ = read_denoiser_state(str(FIX / "dit_release.pt"))
    path = tmp_path / "0400000.pt"
    torch.save({"model": state, "ema": state, "opt": {}, "args": argparse.Namespace(model="DiT-XL/2")}, path)
    with pytest.raises(ValueError, match="allow_pickle=True"):
        load_denoiser(str(path), build("dit", outputs))
    assert load_denoiser(str(path), build("dit", outputs), allow_pickle=True)["source"] == "ema"
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}}, path)  # DDP-wrapped, no EMA
    with pytest.raises(ValueError, match="set use_ema=False"):
        load_denoiser(str(path), build("dit", outputs))
    assert load_denoiser(str(path), build("dit", outputs), use_ema=False)["source"] == "model"


@pytest.mark.parametrize("name", sorted(CASES))
def test_infer_kwargs_from_file(name, outputs):
    state, _ = read_denoiser_state(str(FIX / CASES[name][1]))
    got = infer_denoiser_kwargs(state)
    kw = outputs[name]["kwargs"]
    for key in ("input_size", "in_channels", "num_classes", "patch_size", "hidden_size", "depth"):
        assert got[key] == kw[key], key
    assert got["family"] == ("tit" if name.startswith("tit") else "dit")
    if name == "tit_variant":
        assert (got["wo_shift"], got["use_swiglu"], got["use_rope"], got["mlp_ratio"]) == (True, False, True, 4.0)
    assert got["learn_sigma"] == (name == "dit")


def test_load_into_meta_built_network(outputs):
    """An XL network costs nothing to build on the meta device; ``assign=True`` then takes the file's tensors."""
    io = outputs["sit"]
    with torch.device("meta"):
        net = build("sit", outputs)
    load_denoiser(str(FIX / "sit_repa.pt"), net, assign=True)
    assert not net.pos_embed.requires_grad and net.blocks[0].attn.qkv.weight.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(net(io["x"], io["t"], io["y"]), io["out"], **TOL)


# --------------------------------------------------------------------------------------------------- contract

TINY = dict(hidden_size=32, depth=2, num_heads=2)


@pytest.mark.parametrize("cls", [DiT, SiT, TiT])
@pytest.mark.parametrize("patch", [1, 2, 4])
def test_contract_shapes_and_adaln_zero(cls, patch):
    net = cls(8, 3, 5, patch_size=patch, **TINY)
    x = torch.randn(2, 3, 8, 8)
    out = net(x, torch.rand(2), torch.tensor([0, 5]))
    assert out.shape == x.shape and net.num_classes == 5 and net.num_tokens == (8 // patch) ** 2
    assert torch.equal(out, torch.zeros_like(out))  # adaLN-Zero: a fresh network outputs exactly 0
    assert net(x, torch.rand(2), torch.tensor([0, 5]), full_output=True).shape[1] == net.out_channels


@pytest.mark.parametrize("cls", [DiT, SiT, TiT])
def test_null_class_no_dropout_time_broadcast(cls):
    g = torch.Generator().manual_seed(0)
    net = cls(8, 4, 10, patch_size=2, **TINY)
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    x, t = torch.randn(4, 4, 8, 8, generator=g), torch.rand(4, generator=g)
    y = torch.tensor([1, 10, 2, 10])
    net.train()  # no label dropout, no dropout of any kind: training mode is deterministic and equal to eval mode
    a, b = net(x, t, y), net(x, t, y)
    assert torch.equal(a, b)
    torch.testing.assert_close(net.eval()(x, t, y), a, rtol=0, atol=0)
    with torch.no_grad():  # y == num_classes reads the last (null) row of the label table, only that row
        net.y_embedder.embedding_table.weight[10].add_(1.0)
        moved = (net(x, t, y) - a).abs().flatten(1).amax(1)
    assert (moved[[1, 3]] > 1e-3).all() and (moved[[0, 2]] == 0).all()
    t0 = torch.tensor(0.3)
    torch.testing.assert_close(net(x, t0, y), net(x, t0.expand(4), y), rtol=0, atol=0)
    torch.testing.assert_close(net(x, t.view(4, 1, 1, 1), y), net(x, t, y), rtol=0, atol=0)


@pytest.mark.parametrize("cls", [SiT, TiT])
def test_grad_checkpointing_same_output_and_grads(cls):
    g = torch.Generator().manual_seed(1)
    nets = [cls(8, 4, 10, grad_checkpointing=ckpt, **TINY) for ckpt in (False, True)]
    nets[1].load_state_dict(nets[0].state_dict())
    for net in nets:  # the same perturbation on both: non-zero adaLN gates, so every block gets a gradient
        noise = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in net.parameters():
                if p.requires_grad:
                    p.add_(0.1 * torch.randn(p.shape, generator=noise))
    x, t, y = torch.randn(2, 4, 8, 8, generator=g), torch.rand(2, generator=g), torch.tensor([3, 10])
    grads = []
    for net in nets:
        net(x, t, y).square().sum().backward()
        grads.append([p.grad for p in net.parameters() if p.requires_grad])
    for ga, gb in zip(*grads):
        torch.testing.assert_close(ga, gb, rtol=1e-6, atol=1e-7)


def test_bad_inputs_are_clear():
    net = SiT(8, 4, 10, **TINY)
    with pytest.raises(ValueError, match=r"expects x of shape \(B, 4, 8, 8\)"):
        net(torch.randn(2, 4, 16, 16), torch.rand(2), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="class-conditional: pass y"):
        net(torch.randn(2, 4, 8, 8), torch.rand(2), None)
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        SiT(10, 4, 10, patch_size=4, **TINY)
    with pytest.raises(ValueError, match="not divisible by model.num_heads"):
        TiT(8, 4, 10, hidden_size=32, depth=1, num_heads=3)
    uncond = TiT(8, 4, 1, **TINY)  # tit.py:377: no label embedder below two classes; y is ignored
    assert uncond.y_embedder is None and uncond(torch.randn(1, 4, 8, 8), torch.rand(1)).shape == (1, 4, 8, 8)


def test_bf16_autocast_close_to_fp32(outputs):
    """bf16 autocast (the GPU training setting) runs the same code; on the fixture TiT it stays within bf16 rounding
    of the fp32 reference output (8 mantissa bits: relative 2^-8 per op; 5e-2 of the output scale over two
    blocks)."""
    io = outputs["tit"]
    net = build("tit", outputs)
    load_denoiser(str(FIX / "tit_ucgm.pt"), net)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(io["x"], io["t"], io["y"])
    assert (out.float() - io["out"]).abs().max() < 5e-2 * io["out"].abs().max()


# --------------------------------------------------------------------------------------------------- presets

PRESETS = [f"{fam}_{size}" for fam in ("dit", "sit", "tit") for size in ("s", "b", "l", "xl")]


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_parameter_counts(preset):
    """Each conf/model preset, built on the meta device at 32x32x4 latents and 1000 classes, has exactly the
    parameter count of the reference constructor (param_counts.json, computed by the fixture script from the
    reference code); the XL presets also at patch 1 and 4, and TiT-XL is the "≈ 675M" of the paper."""
    counts = json.loads((FIX / "param_counts.json").read_text())
    cfg = OmegaConf.load(Path(ROOT) / "conf" / "model" / f"{preset}.yaml")
    fam, size = preset.split("_")
    prefix = {"dit": "DiT", "sit": "SiT", "tit": "TiT"}[fam]
    patches = [p for p in (1, 2, 4) if f"{prefix}-{size.upper()}/{p}" in counts] if size == "xl" else [2]
    for patch in patches:
        cfg.patch_size = patch
        with torch.device("meta"):
            net = instantiate(cfg)(input_size=32, in_channels=4, num_classes=1000)
        assert count_parameters(net) == counts[f"{prefix}-{size.upper()}/{patch}"], patch
    if preset == "tit_xl":
        assert math.isclose(counts["TiT-XL/2"], 675e6, rel_tol=1e-3)
