"""Shortcut models' objective and sampler (contgen/transport/shortcut.py): the level / time layout of the
reference's targets (shared/reference/shortcut.md §1), the oracle self-consistency test of §6a (the exact ODE map
of 1-D Gaussian data as the half-step network), CFG plumbing on a fake net, and the exact-shortcut sampler."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from contgen.transport.shortcut import ShortcutObjective, ShortcutSampler, bootstrap_levels
from contgen.transport.teacher import Teacher

L = 7  # log2 of the reference's 128 denoise steps
EPS = 1e-5  # the reference's (1 - 1e-5) path


class LabelNet(torch.nn.Module):
    """A fake denoiser whose native velocity is its label as a float, for every pixel: v = y."""

    num_classes = 5

    def forward(self, x, t, y, level):
        return y.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1))).expand_as(x).clone()


def _targets(obj: ShortcutObjective, batch: int, y=None, seed: int = 0, net=None):
    x = torch.randn(batch, 2, 2, 2, generator=torch.Generator().manual_seed(seed))
    y = torch.randint(0, 5, (batch,), generator=torch.Generator().manual_seed(seed + 1)) if y is None else y
    draws = obj.draw(x, torch.Generator().manual_seed(seed + 2))
    teacher = Teacher(net or LabelNet(), policy="online")
    return x, y, draws, obj.targets(teacher, x, y, draws)


@pytest.mark.parametrize("batch,every,per_level,extra_zero", [
    (64, 8, 1, 1), (64, 4, 2, 2), (256, 8, 4, 4), (256, 4, 9, 1)])
def test_level_layout_matches_the_reference(batch, every, per_level, extra_zero):
    """targets_shortcut.py:11-15: rows // 7 rows per level 6..0 (descending), the remainder at level 0 (shortcut.md
    §1.2: B=256 gives 4 per level plus 4 more d=1 rows; B=64 one per level plus one)."""
    obj = ShortcutObjective(bootstrap_every=every)
    rows, levels = obj.layout(batch)
    assert rows == batch // every and levels == bootstrap_levels(rows, L)
    assert levels == sorted(levels, reverse=True)
    hist = Counter(levels)
    assert {lv: hist[lv] for lv in range(L)} == {lv: per_level + (extra_zero if lv == 0 else 0) for lv in range(L)}


@pytest.mark.parametrize("batch,every", [(64, 4), (64, 8), (256, 8), (256, 4)])
def test_time_grid_flow_rows_and_label_dropping(batch, every):
    obj = ShortcutObjective(bootstrap_every=every, class_dropout_prob=1.0)
    x, y, draws, tg = _targets(obj, batch)
    rows = batch // every
    level = tg["level"]
    s = 1 - tg["t"]  # the reference's time (0 = noise)
    d = 2.0 ** -level[:rows].double()
    k = s[:rows].double() / d
    assert torch.equal(k, k.round()), "bootstrap t is a multiple of d (targets_shortcut.py:28-31)"
    assert (s[:rows].double() + d <= 1).all()
    assert torch.equal(level[:rows], torch.tensor(obj.layout(batch)[1])), "bootstrap rows come first"
    assert (level[rows:] == L).all(), "flow rows at level 7 (d = 1/128)"
    k_flow = s[rows:].double() * 128
    assert torch.equal(k_flow, k_flow.round()) and (k_flow >= 0).all() and (k_flow <= 127).all()
    assert torch.equal(tg["y"][:rows], y[:rows]), "bootstrap labels are never dropped (L39, L106)"
    assert (tg["y"][rows:] == 5).all(), "class_dropout_prob=1 drops every flow label to the null class"
    # flow targets are x − (1 − 1e-5)z (negated: contgen's F = −v) on the batch's *other* rows (no reuse, issue #10)
    z = draws["z_flow"]
    assert torch.equal(tg["target"][rows:], -(x[rows:] - (1 - EPS) * z))


def test_t_and_levels_cover_the_grid():
    """Over many draws the bootstrap times hit every grid point k·d of their level (the per-row randint bound)."""
    obj = ShortcutObjective(bootstrap_every=1, denoise_timesteps=8)  # levels 2, 1, 0: 4, 2, 1 grid points
    x = torch.zeros(300, 1)
    draws = obj.draw(x, torch.Generator().manual_seed(0))
    for lv in range(3):
        s = draws["s_boot"][draws["level"] == lv]
        assert sorted(set((s * 2**lv).tolist())) == list(range(2**lv))


def test_cfg_rows_are_exactly_the_level_6_rows():
    """bootstrap_cfg (L48-69): v_unc + w(v_c − v_unc) on the level-6 rows only, conditional elsewhere."""
    w = 1.5
    for assignment in ("deterministic", "random_uniform"):
        obj = ShortcutObjective(bootstrap_every=4, bootstrap_cfg=True, cfg_scale=w, level_assignment=assignment)
        x, y, draws, tg = _targets(obj, 256)
        rows = 64
        lv, yb = tg["level"][:rows], y[:rows].double()
        expected_v = torch.where(lv == L - 1, 5 + w * (yb - 5), yb)  # the fake net's v is its label; null = 5
        got = -tg["target"][:rows, 0, 0, 0].double()
        assert torch.allclose(got, expected_v, rtol=0, atol=1e-6), assignment
        assert (lv == L - 1).any() and (lv != L - 1).any()


def test_refuses_layouts_without_every_level_before_compute():
    with pytest.raises(ValueError, match=r"issue #11.*data.batch_size|data.batch_size.*issue #11"):
        ShortcutObjective(bootstrap_every=8).setup(32)  # 4 bootstrap rows < 7 levels
    with pytest.raises(ValueError, match="split evenly"):
        ShortcutObjective(bootstrap_every=8).setup(12, world_size=3)  # 36 // 8 = 4 rows over 3 devices
    ShortcutObjective(bootstrap_every=8, level_assignment="random_uniform").setup(32)  # the opt-in deviation


def test_global_layout_over_devices_equals_one_device():
    """Under DDP each rank takes every W-th row of the global layout: the global level mix is the reference's for
    the global batch, even where the per-device rows are fewer than the levels (256 over 8 devices: 4 rows each)."""
    single = ShortcutObjective(bootstrap_every=8)
    single.setup(256)
    per_rank = []
    for rank in range(8):
        obj = ShortcutObjective(bootstrap_every=8)
        obj.setup(32, world_size=8, rank=rank)
        rows, levels = obj.layout(32)
        assert rows == 4
        per_rank += levels
    assert Counter(per_rank) == Counter(single.layout(256)[1])


def test_bad_config_names_the_key():
    for kwargs, key in ((dict(denoise_timesteps=100), "objective.denoise_timesteps"),
                        (dict(bootstrap_every=0), "objective.bootstrap_every"),
                        (dict(level_assignment="uniform"), "objective.level_assignment"),
                        (dict(cfg_scale=-1.0), "objective.cfg_scale"),
                        (dict(clip_value=0.0), "objective.clip_value")):
        with pytest.raises(ValueError, match=key):
            ShortcutObjective(**kwargs)
    with pytest.raises(ValueError, match="sampler.steps"):
        ShortcutSampler(steps=3)
    with pytest.raises(ValueError, match="sampler.steps"):
        ShortcutSampler(steps=256, denoise_timesteps=128)


# --- the oracle of shortcut.md §6a ---------------------------------------------------------------------------
M_DATA, S_DATA = 1.5, 0.3  # 1-D data N(m, s²)


def _sigma(s: torch.Tensor) -> torch.Tensor:
    """Std of x_s = (1 − (1 − ε)s)·z + s·x1 for x1 ~ N(m, s²): the exact ODE map between two times is affine."""
    return torch.sqrt((1 - (1 - EPS) * s) ** 2 + s**2 * S_DATA**2)


def _flow_map(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Φ_{a→b}(x) = b·m + σ_b/σ_a·(x − a·m) of the probability-flow ODE of the Gaussian path."""
    return b * M_DATA + _sigma(b) / _sigma(a) * (x - a * M_DATA)


class OracleShortcut(torch.nn.Module):
    """The exact shortcut s*(x, s, d) = (Φ_{s→s+d}(x) − x)/d with d = 2^-level (native time s, 0 = noise)."""

    num_classes = 1

    def forward(self, x, t, y, level):
        s = t.double().reshape(-1, 1)
        d = 2.0 ** -level.double().reshape(-1, 1)
        return (_flow_map(x, s, s + d) - x) / d


def test_oracle_bootstrap_target_is_the_exact_shortcut():
    """With the exact ODE map as the half-step network, two chained d/2 steps are one exact d step, so the bootstrap
    target equals s*(x_t, t, d) to float64 precision (clips off; shortcut.md §6a measured 6e-14 in numpy). Catches a
    wrong level (d vs d/2), a wrong t2, or x_t instead of x2 in the second call."""
    obj = ShortcutObjective(bootstrap_every=1, clip_value=None, class_dropout_prob=0.0)
    x = M_DATA + S_DATA * torch.randn(700, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.zeros(700, dtype=torch.long)
    draws = obj.draw(x, torch.Generator().manual_seed(1))
    tg = obj.targets(Teacher(OracleShortcut(), policy="online"), x, y, draws)
    exact = OracleShortcut()(tg["x_t"], 1 - tg["t"], y, tg["level"])
    err = (-tg["target"] - exact).abs().max().item()
    assert err < 1e-12, err
    assert set(tg["level"].tolist()) == set(range(L))


@pytest.mark.parametrize("steps", [1, 2, 4, 8, 16, 32, 64, 128])
def test_euler_with_the_exact_shortcut_lands_on_the_exact_endpoint(steps):
    """N Euler steps of the exact shortcut at level log2 N are N exact flow-map steps: x_1 = m + σ_1·z for every N."""
    z = torch.randn(64, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x1 = ShortcutSampler(steps=steps, denoise_timesteps=128)(OracleShortcut(), z, torch.zeros(64, dtype=torch.long))
    exact = M_DATA + _sigma(torch.tensor(1.0, dtype=torch.float64)) * z
    assert (x1 - exact).abs().max().item() < 1e-12


def test_sampler_warns_on_cfg_at_a_distilled_level():
    with pytest.warns(UserWarning, match="only valid at 128 steps"):
        ShortcutSampler(steps=4, cfg_scale=1.5)
    ShortcutSampler(steps=128, cfg_scale=1.5)  # the flow level: no warning (pytest's filterwarnings=error would fail)


def test_sampler_cfg_batches_cond_and_uncond_and_zero_means_unconditional():
    """The fake net's v is its label: guided v = null + w(y − null); cfg 0 feeds the null class to every row."""
    z = torch.zeros(3, 1, 1, 1)
    y = torch.tensor([0, 2, 4])
    guided = ShortcutSampler(steps=128, cfg_scale=2.0)(LabelNet(), z, y)
    assert torch.allclose(guided.flatten(), (5 + 2.0 * (y - 5)).float())  # 128 steps of 1/128 sum to v
    uncond = ShortcutSampler(steps=1, cfg_scale=0.0)(LabelNet(), z, y)
    assert torch.allclose(uncond.flatten(), torch.full((3,), 5.0))


def test_loss_is_one_plain_mean_and_logs_per_level():
    """train.py:236-250: one mean of the per-row MSE over the merged batch (not separately normalised parts)."""
    obj = ShortcutObjective(bootstrap_every=4)
    net = LabelNet()
    x = torch.randn(64, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 5, (64,), generator=torch.Generator().manual_seed(1))
    draws = obj.draw(x, torch.Generator().manual_seed(2))
    loss, logs = obj.loss(net, x, y, teacher=Teacher(net, policy="online"), draws=draws)
    tg = obj.targets(Teacher(net, policy="online"), x, y, draws)
    per_row = (-net(tg["x_t"], 1 - tg["t"], tg["y"], tg["level"]) - tg["target"]).square().mean(dim=(1, 2, 3))
    assert torch.allclose(loss, per_row.mean())
    assert torch.allclose(logs["loss_bootstrap"], per_row[:16].mean())
    assert torch.allclose(logs["loss_flow"], per_row[16:].mean())
    for lv in range(L + 1):
        assert torch.allclose(logs[f"loss_level{lv}"], per_row[tg["level"] == lv].mean())
    assert math.isfinite(float(logs["target_rms_bootstrap"]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_half_steps_replayed_as_a_cuda_graph_equal_eager():
    """Under ``cuda_graphs.enabled`` (TransportModule.training_step) the two no-grad half steps replay as one CUDA graph:
    the step's targets and loss equal the eager ones for the same draws, on the capture and on a later replay after an
    in-place weight update (the EMA's lerp). Same kernels on the same shapes: bitwise expected; the fp32 tolerance
    (1e-5) only admits a cuBLAS algorithm chosen differently under capture."""
    from contgen.backbones.dit import ShortcutDiT
    from contgen.utils import cuda_graphs

    dev = torch.device("cuda")
    torch.manual_seed(0)
    net = ShortcutDiT(8, 4, 10, patch_size=2, hidden_size=64, depth=2, num_heads=2).to(dev)
    for p in net.parameters():  # adaLN-Zero: no all-zero outputs
        p.data.normal_(0, 0.02) if not p.any() else None
    obj = ShortcutObjective(denoise_timesteps=8, bootstrap_every=4, bootstrap_cfg=True)
    teacher = Teacher(net, policy="online")
    x, y = torch.randn(32, 4, 8, 8, device=dev), torch.randint(0, 10, (32,), device=dev)
    for seed in (1, 2):  # capture, then replay on new draws and updated weights
        draws = obj.draw(x, torch.Generator(dev).manual_seed(seed))
        eager = obj.targets(teacher, x, y, draws)
        with cuda_graphs.enabled(True):
            graphed = obj.targets(teacher, x, y, draws)
        torch.testing.assert_close(graphed["target"], eager["target"], rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            for p in net.parameters():
                p.mul_(0.99)
    assert len(obj._graphs) == 1
