"""Parity with the Shortcut reference (kvfrans/shortcut-models @ 6010043, JAX) on fixtures its own code made
(tests/fixtures/make_shortcut_fixtures.py): the Flax checkpoint import, the DiT forward, ``get_targets`` with its
recorded random draws, the training loss and its gradient, and Euler sampling.

Tolerances are float32 rounding: the reference and contgen run the same fp32 network with different kernels
(XLA's einsum attention with q/hd vs SDPA with scale 1/hd, fused vs separate q/k/v matmuls), so single outputs of
magnitude ~6 agree to about 1e-6; the loss takes two network passes (targets, then prediction) and a square.
The draws are the reference's own, injected (its time and noise keys are reused between the bootstrap and flow
parts, so they cannot be regenerated independently), and the batch is laid out as the reference reads it
(``images[:bsz]`` then ``images[:B - bsz]``, its issue #10)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from contgen.backbones.dit import ShortcutDiT
from contgen.transport.shortcut import ShortcutObjective, ShortcutSampler
from contgen.transport.teacher import Teacher
from contgen.utils.denoiser_ckpt import load_denoiser
from contgen.utils.flax_ckpt import shortcut_state_dict

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "reference" / "shortcut"
CKPT = FIX / "dit_ckpt.pkl"
ATOL = 5e-6  # ~10 float32 ulps at |out| ~ 6 (measured: <= 1.2e-6 forward, <= 1.9e-6 after 16 Euler steps)
CASES = ["b16_be2", "b16_be2_ema0", "b16_be2_cfg", "b32_be2_bias_cfg", "b64_be8", "b16_be2_m16"]


def nchw(a) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a, dtype=np.float32)).permute(0, 3, 1, 2).contiguous()


def _net(use_ema: bool) -> ShortcutDiT:
    kw = np.load(FIX / "dit_outputs.npz")
    net = ShortcutDiT(8, 4, int(kw["kw_num_classes"]), patch_size=int(kw["kw_patch_size"]),
                      hidden_size=int(kw["kw_hidden_size"]), depth=int(kw["kw_depth"]),
                      num_heads=int(kw["kw_num_heads"]), mlp_ratio=float(kw["kw_mlp_ratio"]))
    report = load_denoiser(str(CKPT), net, use_ema=use_ema, allow_pickle=True)
    assert report["source"] == ("ema" if use_ema else "model")
    return net.eval()


@pytest.fixture(scope="module")
def nets():
    return {False: _net(False), True: _net(True)}


def test_flax_checkpoint_needs_the_pickle_opt_in():
    net = ShortcutDiT(8, 4, 5, patch_size=2, hidden_size=16, depth=2, num_heads=2, mlp_ratio=2.0)
    with pytest.raises(ValueError, match="allow_pickle"):
        load_denoiser(str(CKPT), net)


@pytest.mark.parametrize("use_ema", [False, True])
def test_forward_equals_the_reference(nets, use_ema):
    d = np.load(FIX / "dit_outputs.npz")
    with torch.no_grad():
        out = nets[use_ema](nchw(d["x"]), torch.from_numpy(d["t"]), torch.from_numpy(d["y"]).long(),
                            level=torch.from_numpy(d["dt"]))
    ref = nchw(d["out_ema" if use_ema else "out"])
    assert (out - ref).abs().max().item() < ATOL
    assert (nets[True].x_embedder.proj.weight - nets[False].x_embedder.proj.weight).abs().max() > 1e-3


def _case(name: str, nets):
    d = np.load(FIX / f"targets_{name}.npz")
    B, every, M = int(d["cfg_batch_size"]), int(d["cfg_bootstrap_every"]), int(d["cfg_denoise_timesteps"])
    obj = ShortcutObjective(denoise_timesteps=M, bootstrap_every=every, bootstrap_ema=bool(d["cfg_bootstrap_ema"]),
                            bootstrap_cfg=bool(d["cfg_bootstrap_cfg"]), bootstrap_dt_bias=bool(d["cfg_bootstrap_dt_bias"]),
                            cfg_scale=float(d["cfg_cfg_scale"]), class_dropout_prob=float(d["cfg_class_dropout_prob"]))
    rows = B // every
    images, labels = nchw(d["images"]), torch.from_numpy(d["labels"]).long()
    x = torch.cat([images[:rows], images[:B - rows]])  # the reference's rows (issue #10): bootstrap, then flow
    y = torch.cat([labels[:rows], labels[:B - rows]])
    level = torch.tensor(obj.layout(B)[1])
    draws = {"level": level, "s_boot": torch.from_numpy(d["draw_t_boot"]).float() / 2.0 ** level.float(),
             "z_boot": nchw(d["draw_x0_boot"]), "drop": torch.from_numpy(d["draw_drop"][:B - rows]),
             "s_flow": torch.from_numpy(d["draw_t_flow"][:B - rows]).float() / M,
             "z_flow": nchw(d["draw_x0_flow"][:B - rows])}
    teacher = Teacher(nets[True] if obj.bootstrap_ema else nets[False], policy="online")
    return d, obj, x, y, draws, teacher


@pytest.mark.parametrize("name", CASES)
def test_targets_equal_the_reference(nets, name):
    d, obj, x, y, draws, teacher = _case(name, nets)
    tg = obj.targets(teacher, x, y, draws)
    assert torch.equal(tg["level"].float(), torch.from_numpy(d["out_dt_base"]))
    assert torch.equal(1 - tg["t"], torch.from_numpy(d["out_t"])), "contgen t = 1 − s exactly on the dyadic grid"
    assert torch.equal(tg["y"], torch.from_numpy(d["out_labels_dropped"]).long())
    assert torch.equal(tg["x_t"], nchw(d["out_x_t"])), "the (1 − 1e-5) path, bit for bit"
    v = nchw(d["out_v_t"])
    rows = draws["level"].shape[0]
    assert torch.equal(-tg["target"][rows:], v[rows:]), "flow targets x − (1 − 1e-5)z, bit for bit"
    assert (-tg["target"][:rows] - v[:rows]).abs().max().item() < ATOL
    for ours, ref in (("target_rms_bootstrap", "v_magnitude_bootstrap"), ("target_rms_b1", "v_magnitude_b1"),
                      ("target_rms_b2", "v_magnitude_b2")):
        assert abs(float(tg["rms"][ours]) - float(d[f"info_{ref}"])) < ATOL


def test_degenerate_layout_is_refused(nets):
    """4 bootstrap rows for 7 levels: the reference silently trains only d = 1 ([0, 0, 0, 0] here, its issue #11)."""
    d = np.load(FIX / "targets_b16_be4_degenerate.npz")
    assert (d["out_dt_base"][:4] == 0).all()
    with pytest.raises(ValueError, match="issue #11"):
        ShortcutObjective(bootstrap_every=4).setup(int(d["cfg_batch_size"]))


@pytest.mark.parametrize("name", ["b16_be2", "b64_be8"])
def test_loss_and_gradient_equal_the_reference(name):
    net = _net(False).train()
    ema = _net(True)
    d, obj, x, y, draws, teacher = _case(name, {False: net, True: ema})
    ref = np.load(FIX / f"loss_{name}.npz")
    loss, logs = obj.loss(net, x, y, teacher=teacher, draws=draws)
    assert abs(loss.item() - float(ref["loss"])) < 1e-5 * float(ref["loss"])
    assert abs(logs["loss_flow"].item() - float(ref["loss_flow"])) < 1e-5 * float(ref["loss_flow"])
    assert abs(logs["loss_bootstrap"].item() - float(ref["loss_bootstrap"])) < 1e-4 * float(ref["loss_bootstrap"])
    loss.backward()
    tree: dict = {}
    for key in ref.files:
        if key.startswith("grad/"):
            node = tree
            *path, leaf = key[len("grad/"):].split("/")
            for p in path:
                node = node.setdefault(p, {})
            node[leaf] = ref[key]
    grads, _ = shortcut_state_dict(tree)
    params = dict(net.named_parameters())
    worst = max(((params[k].grad - g).abs().max() / g.abs().max().clamp(min=1e-12)).item() for k, g in grads.items())
    assert worst < 1e-4, worst  # relative to each tensor's largest entry: fp32 accumulation over 16-64 rows


@pytest.mark.parametrize("steps", [1, 2, 4, 8, 16])
def test_euler_sampling_equals_the_reference(nets, steps):
    d = np.load(FIX / "sampling.npz")
    x = ShortcutSampler(steps=steps, denoise_timesteps=16)(nets[False], nchw(d["eps"]),
                                                           torch.from_numpy(d["labels"]).long())
    assert (x - nchw(d[f"x_N{steps}"])).abs().max().item() < ATOL


def test_cfg_and_ema_sampling_equal_the_reference(nets):
    d = np.load(FIX / "sampling.npz")
    eps, labels = nchw(d["eps"]), torch.from_numpy(d["labels"]).long()
    x = ShortcutSampler(steps=16, denoise_timesteps=16, cfg_scale=float(d["cfg_scale"]))(nets[False], eps, labels)
    assert (x - nchw(d["x_N16_cfg"])).abs().max().item() < ATOL
    x = ShortcutSampler(steps=4, denoise_timesteps=16)(nets[True], eps, labels)
    assert (x - nchw(d["x_N4_ema"])).abs().max().item() < ATOL


def test_module_init_from_the_reference_checkpoint_in_its_local_directory_layout(tmp_path):
    """On a local path the reference's Checkpoint._save leaves ``<path>/<name>.tmp`` (checkpoint.py:67-71); the
    transport module's init (``module.init_ckpt`` / ``reference=``) takes that directory: params -> the weights,
    params_ema -> the EMA copy."""
    import functools
    import shutil

    from contgen.modules.transport import TransportModule
    from contgen.tokenizers.patch import PatchTokenizer
    from tests.helpers import train_optim

    ckpt_dir = tmp_path / "shortcut_ckpt"
    ckpt_dir.mkdir()
    shutil.copy(CKPT, ckpt_dir / "shortcut_ckpt.tmp")
    tiny = functools.partial(ShortcutDiT, patch_size=2, hidden_size=16, depth=2, num_heads=2, mlp_ratio=2.0)
    module = TransportModule(PatchTokenizer(8, 1, channels=4), tiny, ShortcutObjective(bootstrap_every=1), ShortcutSampler(1),
                             num_classes=5, optim=train_optim(), init_ckpt=str(ckpt_dir))
    with pytest.raises(ValueError, match="allow_pickle"):
        module.load_init(str(ckpt_dir))
    module.load_init(str(ckpt_dir), allow_pickle=True)
    for ours, ref in ((module.net.denoiser, _net(False)), (module.ema.shadow.denoiser, _net(True))):
        assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), ref.state_dict().values()))
