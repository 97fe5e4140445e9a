"""Solvers (contgen/transport/solvers.py): UCGM-S identities, CFG interval, Euler/Heun, and parity with the
reference's ``sampling_loop`` on fixtures it made (tests/fixtures/make_ucgm_sampling_fixtures.py,
cccvs/UCGM @ ae74912), replaying its recorded noise draws."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from contgen.transport import TRANSPORTS, Linear, build_transport
from contgen.transport.solvers import CFGDenoiser, EulerSampler, HeunSampler, UCGMSampler, time_grid
from tests.transport.toy_denoiser import ToyDenoiser

pytestmark = pytest.mark.usefixtures("one_thread")

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "reference" / "ucgm"
PARITY = sorted(p.stem for p in FIXTURES.glob("sampling_*.pt") if p.stem != "sampling_transports")
F32 = torch.finfo(torch.float32).eps


class Recorder:
    """Wraps a denoiser; records (batch size, fed time, input) of every call."""

    def __init__(self, net):
        self.net, self.calls = net, []
        self.num_classes = getattr(net, "num_classes", None)

    def __call__(self, x, t, y):
        self.calls.append((x.shape[0], t.clone(), x.clone()))
        return self.net(x, t, y)


def _toy(channels=3, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return ToyDenoiser(channels=channels, num_classes=4).to(dtype).eval()


def _inputs(shape=(3, 3, 4, 4), seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=dtype), torch.arange(shape[0]) * 3 % 5  # 4 = the null class


def _end_sigma(tr):
    """α(0)/γ(0): the noise left at t = 0 in data units (0 for all transports but EDM: σ_min = e^{-6.36})."""
    zero = torch.tensor(0.0, dtype=torch.float64)
    return float(tr.alpha_in(zero) / tr.gamma_in(zero))


# ------------------------------------------------------------------------------------------------------ grid
def test_two_step_grid_with_gaps():
    """unigen.py:384-391: linspace(0.001, 1 − 0.5, 2) reflected, 0 appended (float64; 1e-15 = a few ulps)."""
    torch.testing.assert_close(time_grid(2, (1.0, 1.0, 1.0), (0.001, 0.5)),
                               torch.tensor([0.999, 0.5, 0.0], dtype=torch.float64), rtol=0, atol=1e-15)
    # end gap 0: linspace over steps + 1 points, last dropped, so the grid starts at 1 − start_gap and ends at 0
    torch.testing.assert_close(time_grid(4, (1.0, 1.0, 1.0), (0.0, 0.0)),
                               torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64), rtol=0, atol=1e-15)


def test_kumaraswamy_grid_is_decreasing_and_denser_near_noise():
    g = time_grid(40, (1.17, 0.8, 1.1), (0.001, 0.001))
    steps = -g.diff()
    assert g.shape == (41,) and (steps > 0).all() and g[-1] == 0
    assert steps[0] < steps[-2]  # ucgm.md §2.1: ~0.007 near noise, growing to ~0.06 near data
    assert 0.99 < float(g[0]) < 1.0 and 0.0 < float(g[-2]) < 0.01


# ------------------------------------------------------------------------------------------------------ UCGM-S
def test_rho0_kappa0_linear_equals_euler():
    """ρ = 0, κ = 0 on Linear: x' = (1 − t')x̂ + t'ẑ = x + (t' − t)F (ucgm.md §2.2, algebraically Euler).
    Both run in float64 on the same grid; the DDIM form differs from x + hF by rounding only: 1e-12 over
    8 steps with |x| ~ 3 is >1e3 ulps of headroom."""
    net = _toy()
    noise, y = _inputs()
    kw = dict(time_dist_ctrl=(1.17, 0.8, 1.1), rfba_gap_steps=(0.001, 0.001))
    out = UCGMSampler(8, return_x="final_x", **kw)(net, noise, y)
    grid = time_grid(8, **kw)
    x = noise.clone()
    for t, t_next in zip(grid[:-1].tolist(), grid[1:].tolist()):
        x = x + (t_next - t) * net(x, torch.full((x.shape[0],), t, dtype=x.dtype), y)
    torch.testing.assert_close(out, x, rtol=0, atol=1e-12)
    torch.testing.assert_close(EulerSampler(8, **kw)(net, noise, y), x, rtol=0, atol=1e-12)


def test_extrapolation_leaves_the_first_two_steps_unchanged():
    """κ acts from the 3rd step on (unigen.py:409-416, ``i > 1``): the first three network inputs (x_0, x_1, x_2)
    are bit-identical with κ = 0 and κ = 0.5; the 4th differs."""
    runs = []
    for kappa in (0.0, 0.5):
        rec = Recorder(_toy())
        noise, y = _inputs()
        UCGMSampler(6, extrapol_ratio=kappa)(rec, noise, y)
        runs.append([c[2] for c in rec.calls])
    for i in range(3):
        assert torch.equal(runs[0][i], runs[1][i]), i
    assert not torch.allclose(runs[0][3], runs[1][3])


def test_extrapolation_uses_the_raw_previous_prediction():
    """x̂_used = x̂_i + κ(x̂_i − x̂_{i−1}) with the *raw* x̂_{i−1}: reconstructed from the stack of raw x̂
    (return_x='stack') on Linear with ρ = 0, against the state fed at the next step. float64, 1e-12."""
    rec = Recorder(_toy())
    noise, y = _inputs()
    kappa = 0.4
    s = UCGMSampler(5, extrapol_ratio=kappa, return_x="stack", time_dist_ctrl=(1, 1, 1))
    stack = s(rec, noise, y)
    grid, tr = s.grid, Linear()
    x_hats = stack[1:]
    for i in range(2, 4):
        x_i = rec.calls[i][2]
        F = rec.net(x_i, torch.full((3,), float(grid[i]), dtype=x_i.dtype), y)
        x_hat, z_hat = tr.estimates(F, x_i, grid[i])
        prev_x, prev_z = tr.estimates(rec.net(rec.calls[i - 1][2], torch.full((3,), float(grid[i - 1]),
                                                                            dtype=x_i.dtype), y),
                                      rec.calls[i - 1][2], grid[i - 1])
        torch.testing.assert_close(x_hats[i], x_hat, rtol=0, atol=1e-12)
        xe, ze = x_hat + kappa * (x_hat - prev_x), z_hat + kappa * (z_hat - prev_z)
        t1 = float(grid[i + 1])
        torch.testing.assert_close(rec.calls[i + 1][2], (1 - t1) * xe + t1 * ze, rtol=0, atol=1e-12)


def test_rho1_two_steps_is_denoise_renoise_denoise():
    """ρ = 1, 2 steps, gaps (0.001, 0.5): x̂_0 = x̂(z, 0.999); x_1 = γ(0.5)x̂_0 + α(0.5)ε; result x̂(x_1, 0.5)
    (the reference returns the last raw x̂). The sampler's first draw is randn(shape, generator); float64, 1e-12."""
    net = _toy()
    noise, y = _inputs()
    tr = Linear()
    s = UCGMSampler(2, stochast_ratio=1.0, time_dist_ctrl=(1, 1, 1), rfba_gap_steps=(0.001, 0.5))
    out = s(net, noise, y, generator=torch.Generator().manual_seed(5))
    eps = torch.randn(noise.shape, generator=torch.Generator().manual_seed(5), dtype=noise.dtype)
    x_hat0, _, _ = tr.predict(net, noise, torch.tensor(0.999, dtype=torch.float64), y)
    x1 = 0.5 * x_hat0 + 0.5 * eps
    x_hat1, _, _ = tr.predict(net, x1, torch.tensor(0.5, dtype=torch.float64), y)
    torch.testing.assert_close(out, x_hat1, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", sorted(TRANSPORTS))
def test_ddim_is_exact_for_a_single_data_point(name):
    """Oracle denoiser of a one-point data set x0 (F = α̂ẑ + γ̂x0 with ẑ = (x_t − γx0)/α): the ρ = 0 update
    stays on the path α(t)z + γ(t)x0, so UCGM-S ends at x0 for every transport (rounding only: 1e-10 in float64
    at |x| ~ 3; the worst conversion is EDM's, x̂ = (αF − α̂x_t)/2 with O(1) terms). Checks the transport
    algebra, the native-time/sign adapter and the update together."""
    tr = build_transport(name)
    x0, _ = _inputs(seed=4)
    noise, y = _inputs(seed=5)

    def oracle(x, t_native, y):
        t = tr.native_time(t_native).reshape(-1, 1, 1, 1)  # native_time is an involution
        z_hat = (x - tr.gamma_in(t) * x0) / tr.alpha_in(t)
        return tr.output_sign * (tr.alpha_to(t) * z_hat + tr.gamma_to(t) * x0)

    x_start = tr.interpolate(x0, noise, time_grid(5, (1.17, 0.8, 1.1), (0.001, 0.001))[0])
    out = UCGMSampler(5, return_x="last_xhat", transport=name)(oracle, x_start, y)
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-10)
    # final x (data units): x0 + (α(0)/γ(0))·z, i.e. x0 except for EDM, whose path ends at σ_min = e^{-6.36}
    out = UCGMSampler(5, return_x="final_x", transport=name)(oracle, x_start, y)
    torch.testing.assert_close(out, x0 + _end_sigma(tr) * noise, rtol=0, atol=1e-10)


def test_order2_correction_count_and_start_gap_check():
    """Order 2 (unigen.py:380-447): ceil(steps/2) intervals, correction on all but the last when end_gap > 0
    (NFE 2n − 1), on all when end_gap == 0 (NFE 2n); γ(t_0) = 0 (start_gap 0) is refused."""
    noise, y = _inputs()
    for gaps, nfe in (((0.001, 0.001), 2 * 4 - 1), ((0.001, 0.0), 2 * 4)):
        rec = Recorder(_toy())
        s = UCGMSampler(7, order=2, rfba_gap_steps=gaps)
        s(rec, noise, y)
        assert len(rec.calls) == nfe == s.nfe, gaps
    with pytest.raises(ValueError, match="rfba_gap_steps"):
        UCGMSampler(4, order=2, rfba_gap_steps=(0.0, 0.001))


def test_sde_ratio_is_the_first_steps_value():
    """'SDE': ρ = clamp((√|t1 − t0|·√(2α(t0))/α(t1))², 0, 1) from the first interval, reused (the reference's
    overwrite, unigen.py:418-425)."""
    s = UCGMSampler(5, stochast_ratio="SDE", transport="trigflow", time_dist_ctrl=(1, 1, 1))
    t0, t1 = float(s.grid[0]), float(s.grid[1])
    a = lambda t: math.sin(1.57 * t)  # noqa: E731
    expected = min(1.0, (math.sqrt(abs(t1 - t0)) * math.sqrt(2 * a(t0)) / a(t1)) ** 2)
    assert 0 < expected < 1
    assert s._rho == pytest.approx([expected] * 5, rel=1e-12)


def test_generator_drives_every_draw_and_global_rng_is_untouched():
    net = _toy()
    noise, y = _inputs()
    s = UCGMSampler(3, stochast_ratio=0.7)
    state = torch.get_rng_state()
    a = s(net, noise, y, generator=torch.Generator().manual_seed(1))
    b = s(net, noise, y, generator=torch.Generator().manual_seed(1))
    c = s(net, noise, y, generator=torch.Generator().manual_seed(2))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b) and not torch.allclose(a, c)


@pytest.mark.parametrize("shape", [(6, 5), (8, 2), (2, 3, 4, 4)])
def test_shapes_and_dtype(shape):
    """(N, D) tokens, (B, 2) points, images; the network runs in the noise's dtype, the result has it too."""
    net = _toy(channels=shape[1], dtype=torch.float32)
    noise, y = _inputs(shape, dtype=torch.float32)
    seen = []

    def rec(x, t, yy):
        seen.append((x.dtype, t.dtype, t.shape))
        return net(x, t, yy)

    rec.num_classes = 4
    for sampler in (UCGMSampler(3, stochast_ratio=0.5, extrapol_ratio=0.3, cfg_scale=2.0), EulerSampler(3),
                    HeunSampler(3)):
        before = len(seen)
        out = sampler(rec, noise, y, generator=torch.Generator().manual_seed(0))
        assert out.shape == noise.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
        assert len(seen) - before == sampler.nfe
    assert all(s[0] == torch.float32 and s[1] == torch.float32 and len(s[2]) == 1 for s in seen)


# ------------------------------------------------------------------------------------------------------ CFG
@pytest.mark.parametrize("name", ["linear", "relinear"])
def test_cfg_interval_in_native_time(name):
    """Guidance (2B rows: labels then the null class) exactly at the evaluations whose *native* time lies in
    [lo, hi] (both ends included), conditional B rows elsewhere (sit.py:296-324)."""
    rec = Recorder(_toy())
    noise, y = _inputs()
    lo, hi = 0.3, 0.6
    s = UCGMSampler(10, cfg_scale=2.0, cfg_interval=(lo, hi), transport=name, time_dist_ctrl=(1, 1, 1))
    s(rec, noise, y)
    assert len(rec.calls) == 10
    for n, t, _ in rec.calls:
        inside = lo <= float(t[0]) <= hi
        assert n == (6 if inside else 3), (float(t[0]), n)
    assert {n for n, _, _ in rec.calls} == {3, 6}  # both cases occur
    internal = [float(t[0]) for _, t, _ in rec.calls]
    if name == "relinear":  # native = 1 − internal grid time
        torch.testing.assert_close(torch.tensor(internal, dtype=torch.float64), 1 - s.grid[:-1].float().double(),
                                   rtol=0, atol=1e-7)


def test_cfg_combination_and_switches():
    """guided = uncond + w(cond − uncond) on the raw output; channels= guides the first k only; w <= 0 and
    w == 1 run no unconditional pass (w <= 0 is 'off' as the reference's eval.py:131)."""
    net = _toy()
    x, y = _inputs()
    t = torch.full((3,), 0.4, dtype=torch.float64)
    null = torch.full_like(y, 4)
    cond, uncond = net(x, t, y), net(x, t, null)
    torch.testing.assert_close(CFGDenoiser(net, 3.0)(x, t, y, guide=True), uncond + 3.0 * (cond - uncond),
                               rtol=0, atol=1e-12)
    part = CFGDenoiser(net, 3.0, channels=2)(x, t, y, guide=True)
    torch.testing.assert_close(part[:, :2], (uncond + 3.0 * (cond - uncond))[:, :2], rtol=0, atol=1e-12)
    torch.testing.assert_close(part[:, 2:], cond[:, 2:], rtol=0, atol=1e-12)
    for w in (0.0, -1.0, 1.0):
        rec = Recorder(net)
        UCGMSampler(3, cfg_scale=w)(rec, x, y)
        assert all(n == 3 for n, _, _ in rec.calls)


# ------------------------------------------------------------------------------------------------------ Euler / Heun
def test_euler_first_order_heun_second_order():
    """dx/dt = a·x (Linear, F = a·x), exact x(0) = x(1)·e^{−a}. Global error ratio when the grid is refined 2x:
    Euler → 2, Heun → 4 (order 1 vs 2; the last Heun interval is an Euler step, a local O(h²) term that keeps
    the global order 2). Bounds: ratio within ±15% of 2 and 4 at 16 → 32 intervals."""
    a = 1.3
    x1 = torch.ones(1, 1, dtype=torch.float64)

    def net(x, t, y):
        return a * x

    exact = math.exp(-a)
    kw = dict(time_dist_ctrl=(1, 1, 1), rfba_gap_steps=(0.0, 0.0))
    e = [abs(float(EulerSampler(n, **kw)(net, x1, None)) - exact) for n in (16, 32)]
    h = [abs(float(HeunSampler(2 * n, **kw)(net, x1, None)) - exact) for n in (16, 32)]
    assert 1.7 < e[0] / e[1] < 2.3
    assert 3.4 < h[0] / h[1] < 4.6
    assert h[1] < e[1] / 50


@pytest.mark.parametrize("name", sorted(TRANSPORTS))
def test_heun_follows_the_probability_flow_of_every_transport(name):
    """One-point oracle (the velocity α'ẑ + γ'x̂ is then the exact probability flow of the path αz + γx0):
    Heun on a uniform grid from t = 1 to 0 lands on x0 (+ EDM's σ_min·z) with an error that falls ~4x per
    halving of the step (order 2; the final error is dominated by the last, uncorrected interval, since
    deviations are contracted by α(t) -> 0). Linear/ReLinear/Shortcut paths are straight: exact up to rounding (1e-12).
    Measured at 40 / 80 intervals: EDM 1.5e-4 / 3.4e-5, TrigFlow and TrigLinear 2.2e-3 / 5.6e-4;
    bounds 3e-3 and a ratio > 3."""
    tr = build_transport(name)
    x0, _ = _inputs(seed=4)
    noise, y = _inputs(seed=5)

    def oracle(x, t_native, y):
        t = tr.native_time(t_native).reshape(-1, 1, 1, 1)
        z_hat = (x - tr.gamma_in(t) * x0) / tr.alpha_in(t)
        return tr.output_sign * (tr.alpha_to(t) * z_hat + tr.gamma_to(t) * x0)

    err = []
    for n in (40, 80):
        s = HeunSampler(2 * n, time_dist_ctrl=(1, 1, 1), rfba_gap_steps=(0.0, 0.0), transport=name)
        out = s(oracle, tr.interpolate(x0, noise, s.grid[0]), y)
        err.append(float((out - x0 - _end_sigma(tr) * noise).abs().max()))
    if name in ("linear", "relinear", "shortcut"):
        assert max(err) < 1e-12
    else:
        assert err[0] < 3e-3 and err[0] / err[1] > 3, err


# ------------------------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("name", PARITY)
def test_parity_with_reference_sampling_loop(name):
    """Replays the reference run: same toy weights, initial noise, labels and the recorded fresh draws (served
    through ``noise_fn``), compared over the reference's whole return value (the stack of raw x̂).

    Tolerances: the reference builds its grid and its conversions in float32 (grid cast to the noise dtype,
    L385; x̂, ẑ from float32 x_t and t, L207-208) while contgen keeps float64; the network runs in float32 in both.
    - fed times: within 5e-7 (the reference's float32 Kumaraswamy warp is off by a few ulps);
    - batch sizes of every call identical (grid length, order-2 corrections, CFG interval and batching);
    - outputs: |Δ| <= 2e-6 · max(1, max|ref|) · A, i.e. ~17 float32 ulps of the output scale, where A = 1 for
      order 1 and A = 1/γ(t_0) for order 2, whose correction divides by γ(t_0) (L443-446) and so amplifies the
      reference's own float32 rounding by that factor (1000x at start gap 0.001).
    """
    data = torch.load(FIXTURES / f"{name}.pt", weights_only=True)
    c = data["config"]
    toy = ToyDenoiser(data["toy"]["channels"], data["toy"]["num_classes"], data["toy"]["hidden"]).eval()
    toy.load_state_dict(data["toy"]["state_dict"])
    rec = Recorder(toy)
    sampler = UCGMSampler(c["sampling_steps"], stochast_ratio=c["stochast_ratio"],
                          extrapol_ratio=c["extrapol_ratio"], order=c["sampling_order"],
                          time_dist_ctrl=c["time_dist_ctrl"], rfba_gap_steps=c["rfba_gap_steps"],
                          cfg_scale=c["cfg_scale"], cfg_interval=c["cfg_interval"], return_x="stack",
                          transport=c["transport"])
    draws = iter(data["draws"])

    def noise_fn(shape):
        d = next(draws)
        assert d.shape == shape
        return d

    out = sampler(rec, data["noise"], data["y"], noise_fn=noise_fn)
    assert next(draws, None) is None, "contgen made fewer draws than the reference"
    assert [n for n, _, _ in rec.calls] == [n for n, _ in data["calls"]]
    for (_, t, _), (_, t_ref) in zip(rec.calls, data["calls"]):
        torch.testing.assert_close(t, t_ref, rtol=0, atol=5e-7)
    ref = data["stack"]
    amp = 1.0 if c["sampling_order"] == 1 else 1.0 / float(sampler.transport.gamma_in(sampler.grid[0]))
    bound = 2e-6 * max(1.0, float(ref.abs().max())) * amp
    assert out.shape == ref.shape and out.dtype == ref.dtype
    err = float((out - ref).abs().max())
    assert err <= bound, (err, bound)
    # and the reference's result proper (eval.py:227 takes [-1]) is what return_x='last_xhat' gives
    sampler.return_x = "last_xhat"
    draws = iter(data["draws"])
    torch.testing.assert_close(sampler(toy, data["noise"], data["y"], noise_fn=noise_fn), out[-1], rtol=0, atol=0)


def test_re_noise_draws_are_made_up_front_in_step_order():
    """UCGM-S draws every ρ > 0 step's noise before the loop (so a CUDA graph can replay the loop on them): the
    call equals the loop fed the same generator's draws stacked in step order, bit for bit."""
    net, y = ToyDenoiser(), torch.tensor([0, 1, 2])
    noise = torch.randn(3, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    s = UCGMSampler(3, stochast_ratio=0.5, extrapol_ratio=0.3, time_dist_ctrl=(1, 1, 1), rfba_gap_steps=(0.001, 0.2))
    out = s(net, noise, y, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    eps = torch.stack([torch.randn(noise.shape, generator=g, dtype=noise.dtype) for _ in range(3)])
    cfg = s._cfg(net)
    assert torch.equal(out, s._loop(cfg, s._nodes(noise.dtype, cfg), noise, y, eps))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_replay_equals_eager():
    """Under ``cuda_graphs.enabled`` the solvers' loops (UCGM-S with re-noise and with extrapolation, Euler, Shortcut)
    replay as CUDA graphs: a capture, then a replay on new noise, each equal to the eager call on the same seed. The
    kernels are the eager ones on the same shapes, so equality is expected bit for bit; the fp32 tolerance (1e-5)
    only admits a cuBLAS algorithm chosen differently under capture (a different fp32 summation order)."""
    from contgen.backbones.dit import ShortcutDiT
    from contgen.backbones.tit import TiT
    from contgen.transport.shortcut import ShortcutSampler
    from contgen.utils import cuda_graphs

    dev = torch.device("cuda")
    torch.manual_seed(0)
    tit = TiT(8, 4, 10, patch_size=2, hidden_size=64, depth=2, num_heads=2, compile_blocks=False).to(dev).eval()
    dit = ShortcutDiT(8, 4, 10, patch_size=2, hidden_size=64, depth=2, num_heads=2).to(dev).eval()
    for p in (*tit.parameters(), *dit.parameters()):  # adaLN-Zero: no all-zero outputs
        p.data.normal_(0, 0.02) if not p.any() else None
    y = torch.arange(4, device=dev)
    cases = [(tit, UCGMSampler(2, stochast_ratio=1.0, time_dist_ctrl=(1, 1, 1), rfba_gap_steps=(0.001, 0.3))),
             (tit, UCGMSampler(6, extrapol_ratio=0.21, cfg_scale=2.0, cfg_interval=(0.0, 0.75))),
             (tit, EulerSampler(4)), (dit, ShortcutSampler(4, denoise_timesteps=8, cfg_scale=1.5))]
    for net, sampler in cases:
        for seed in (1, 2):  # capture, then replay
            noise = torch.randn(4, 4, 8, 8, device=dev, generator=torch.Generator(dev).manual_seed(seed))
            eager = sampler(net, noise, y, torch.Generator(dev).manual_seed(seed))
            with cuda_graphs.enabled(True):
                graphed = sampler(net, noise, y, torch.Generator(dev).manual_seed(seed))
            torch.testing.assert_close(graphed, eager, rtol=1e-5, atol=1e-5)
        assert len(sampler._graphs) == 1
