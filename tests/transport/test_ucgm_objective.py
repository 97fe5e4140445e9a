"""UCGM-T (contgen/transport/ucgm.py): parity with the reference's ``training_step`` on fixtures made by the
reference code, the λ = 0 reduction to flow matching, the finite-difference tangents against ``torch.func.jvp``,
the enhanced-target rules, label drop, shapes and generator-driven draws. CPU, fixed seeds, seconds."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from contgen.transport.teacher import Teacher
from contgen.transport.transports import TRANSPORTS, build_transport
from contgen.transport.ucgm import UCGMObjective, mean_flat, sample_beta
from tests.fixtures.make_ucgm_training_fixtures import TinyNet

pytestmark = pytest.mark.usefixtures("one_thread")
FIX = Path(__file__).resolve().parents[1] / "fixtures" / "reference" / "ucgm"
FILES = ["training_lam0.pt", "training_lam05.pt", "training_lam1.pt", "training_transports.pt"]


# ------------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------------
class SmoothMLP(nn.Module):
    """A smooth (tanh) class-conditional denoiser on (B, D) with small outputs, for the tangent checks."""

    def __init__(self, dim: int = 4, num_classes: int = 3, hidden: int = 32, scale: float = 0.3, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.num_classes, self.scale = num_classes, scale
        self.inp = nn.Linear(dim + 2, hidden)
        self.emb = nn.Embedding(num_classes + 1, hidden)
        self.hid = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, dim)

    def forward(self, x, t, y):
        t = t.to(x.dtype)[:, None]
        h = torch.tanh(self.inp(torch.cat([x, torch.sin(2 * t), torch.cos(3 * t)], 1)) + self.emb(y))
        return self.scale * self.out(torch.tanh(self.hid(h)))


class Counting(nn.Module):
    """Wraps a denoiser and counts forward calls (the "calls no teacher" checks)."""

    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, 0
        self.num_classes = net.num_classes

    def forward(self, x, t, y):
        self.calls += 1
        return self.net(x, t, y)


def _objective_for(case: dict) -> UCGMObjective:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the ζ >= 1 remap case warns (tested separately)
        return UCGMObjective(case["transport"], consistc_ratio=case["consistc_ratio"],
                             enhanced_ratio=case["enhanced_ratio"], enhanced_style=case["enhanced_style"] or None,
                             scaled_cbl_eps=case["scaled_cbl_eps"], wt_cosine_loss=case["wt_cosine_loss"],
                             weight_function=case["weight_funcion"] or None, time_dist_ctrl=case["time_dist_ctrl"],
                             lab_drop_ratio=case["lab_drop_ratio"], lab_drop="last")


def _load(name):
    return torch.load(FIX / name, weights_only=True)


_CACHE: dict = {}


def _fixture(name):
    if name not in _CACHE:
        _CACHE[name] = _load(name)
    return _CACHE[name]


def _ids():
    out = []
    for name in FILES:
        for i, c in enumerate(_fixture(name)["cases"]):
            out.append(pytest.param(name, i, id=f"{c['transport']}-lam{c['consistc_ratio']}-"
                                    f"{c['enhanced_style'] or 'plain'}{c['enhanced_ratio']}-c{c['scaled_cbl_eps']:g}-"
                                    f"cos{int(c['wt_cosine_loss'])}-w{c['weight_funcion'] or 'none'}"))
    return out


# ------------------------------------------------------------------------------------------------------
# parity with the reference's training_step (fixtures from tests/fixtures/make_ucgm_training_fixtures.py)
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,i", _ids())
def test_parity_with_reference_training_step(name, i):
    """Draws, target F*, loss and dloss/dF equal the reference's for the same seed.

    Tolerance. contgen and the reference run the same float32 operations in the same order (on this machine
    they agree *bit for bit*, every case); what remains is the platform's float32 rounding of the network's
    kernels (~1e-6 relative on F). x̂ differences of δ enter the consistency target multiplied by
    A = |α/den|·4/sin(1.57t)·K with K = 1/(2ε) (λ = 1) or 1/((1−λ)t) (λ ∈ (0, 1)), so the target is checked at
    atol 1e-5·(1 + A) per sample and the loss / gradient at rtol 1e-5, atol 1e-6·(1 + max A)."""
    d = _fixture(name)
    case = d["cases"][i]
    net, tnet = TinyNet(), TinyNet()
    net.load_state_dict(d["net"])
    tnet.load_state_dict(d["teacher"])
    obj = _objective_for(case)
    x, y = d["x"], d["y"]
    # 1) the draws: a CPU generator seeded like the reference's global RNG gives its Beta times and noise
    draws = obj.draw(x, y, d["num_classes"], torch.Generator().manual_seed(case["seed"]))
    torch.testing.assert_close(draws["t"], case["t"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(draws["z"], case["z"], rtol=1e-6, atol=1e-7)
    yd = torch.where(draws["drop"], torch.full_like(y, d["num_classes"]), y)
    assert torch.equal(yd, case["y_after"])  # the reference's in-place drop of the last round(ratio·B) labels
    # replay the reference's own draws exactly
    draws = {"t": case["t"], "z": case["z"], "drop": draws["drop"]}
    counted = Counting(Teacher(tnet, "frozen"))
    F, target, _ = obj.predict_and_target(net, x, y, draws, counted)
    F.retain_grad()
    per = obj.per_sample_loss(F, target)
    w = obj.time_weight(draws["t"])
    loss = (per if w is None else per * w).mean()
    loss.backward()

    lam = case["consistc_ratio"]
    tr = obj.transport
    tt = case["t"].reshape(-1, 1, 1, 1)
    if lam == 0:
        amp = torch.zeros_like(case["t"])
    else:
        k = 1 / (2 * obj.fd_eps) if lam == 1 else 1 / ((1 - lam) * case["t"])
        amp = ((tr.alpha_in(tt) / tr.den(tt)).abs() * 4 / torch.sin(tt * 1.57)).flatten() * k
    atol = (1e-5 * (1 + amp)).reshape(-1, 1, 1, 1)
    err = (target - case["target"]).abs()
    assert bool((err <= atol + 1e-5 * case["target"].abs()).all()), f"target error {err.max():.3g}"
    tol = dict(rtol=1e-5, atol=1e-6 * (1 + float(amp.max())))
    torch.testing.assert_close(per.detach(), case["per_sample"], **tol)
    torch.testing.assert_close(loss.detach(), case["loss"], **tol)
    torch.testing.assert_close(F.grad, case["dF"], **tol)
    # the teacher is read iff the enhanced target is on: 0 calls, or 1 (ft-vs-fe) / 2 (fc-vs-fe) / 1 (fc-vs-xz)
    expected = {None: 0, "ft-vs-fe": 1, "fc-vs-fe": 2, "fc-vs-xz": 1}[case["enhanced_style"] or None]
    assert counted.calls == expected


def test_fixtures_see_the_reference_in_place_enhancement():
    """The reference's enhance_target writes into x (unigen.py:218-222): the fixtures record it, and contgen's
    enhanced x̃ (the reason the consistency branch feeds the network x̃_r, see ucgm.py) equals the mutated x."""
    d = _fixture("training_lam1.pt")
    net, tnet = TinyNet(), TinyNet()
    net.load_state_dict(d["net"])
    tnet.load_state_dict(d["teacher"])
    n_enh = 0
    for case in d["cases"]:
        if not case["enhanced_style"]:
            assert torch.equal(case["x_after"], d["x"])
            continue
        n_enh += 1
        obj = _objective_for(case)
        captured = {}
        orig = obj._consistency_target

        def spy(net_, tr, t, xs, zs, *a, **k):
            captured["xs"] = xs
            return orig(net_, tr, t, xs, zs, *a, **k)

        obj._consistency_target = spy
        drop = obj.draw(d["x"], d["y"], d["num_classes"])["drop"]
        obj.predict_and_target(net, d["x"], d["y"], {"t": case["t"], "z": case["z"], "drop": drop},
                               Teacher(tnet, "frozen"))
        assert not torch.equal(case["x_after"], d["x"])
        torch.testing.assert_close(captured["xs"], case["x_after"], rtol=1e-6, atol=1e-6)
    assert n_enh == 12


def test_sample_beta_is_the_reference_sampler_on_a_generator():
    """sample_beta(a, b, n, generator seeded s) == torch.manual_seed(s); Beta(a, b).sample([n]) bit for bit, and
    the global RNG is not touched."""
    for a, b in [(1.0, 1.0), (0.8, 1.0), (2.4, 2.4), (3.5, 3.5)]:
        torch.manual_seed(7)
        ref = torch.distributions.Beta(a, b).sample([64])
        state = torch.get_rng_state()
        ours = sample_beta(a, b, 64, torch.Generator().manual_seed(7))
        assert torch.equal(ours, ref)
        assert torch.equal(torch.get_rng_state(), state)


def test_loss_uses_only_the_generator():
    """A step with a generator leaves the global RNG alone and is reproducible from the seed."""
    net = TinyNet()
    obj = UCGMObjective("linear", consistc_ratio=1.0, enhanced_ratio=1.5, enhanced_style="fc-vs-fe",
                        lab_drop="random", scaled_cbl_eps=5.0)
    teacher = obj.build_teacher(net)
    x = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 3])
    state = torch.get_rng_state()
    l1, _ = obj.loss(net, x, y, generator=torch.Generator().manual_seed(3), teacher=teacher)
    l2, _ = obj.loss(net, x, y, generator=torch.Generator().manual_seed(3), teacher=teacher)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(l1, l2)
    assert torch.equal(y, torch.tensor([0, 1, 2, 3]))  # labels not mutated


# ------------------------------------------------------------------------------------------------------
# λ = 0 with MSE on Linear is flow matching, bit for bit, with no teacher
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(16, 2), (6, 3, 4, 4)])
def test_lambda0_mse_is_flow_matching_bit_for_bit(shape):
    torch.manual_seed(0)
    if len(shape) == 2:
        net = Counting(SmoothMLP(dim=2, num_classes=3))
    else:
        net = Counting(TinyNet(channels=3, num_classes=3))
    obj = UCGMObjective("linear", consistc_ratio=0.0, loss="mse", weight_function=None, lab_drop="random",
                        lab_drop_ratio=0.3)
    assert not obj.needs_teacher and obj.build_teacher(net) is None
    x = torch.randn(shape)
    y = torch.randint(0, 3, (shape[0],))
    teacher = Counting(SmoothMLP(dim=2, num_classes=3))
    draws = obj.draw(x, y, 3, torch.Generator().manual_seed(5))
    assert bool(draws["drop"].any())  # seed chosen so that some labels are dropped
    loss, _ = obj.loss(net, x, y, teacher=teacher, draws=draws)
    g_obj = torch.autograd.grad(loss, list(net.parameters()))
    assert net.calls == 1 and teacher.calls == 0

    # hand-written rectified-flow / SiT loss: x_t = t z + (1 − t) x, target z − x, per-sample mean, batch mean
    t, z = draws["t"], draws["z"]
    tb = t.reshape(-1, *([1] * (x.ndim - 1)))
    x_t = tb * z + (1 - tb) * x
    y_in = torch.where(draws["drop"], torch.full_like(y, 3), y)
    v = net(x_t, t, y_in)
    hand = ((v - (z - x)) ** 2).mean(dim=list(range(1, x.ndim))).mean()
    g_hand = torch.autograd.grad(hand, list(net.parameters()))
    assert torch.equal(loss, hand)
    assert all(torch.equal(a, b) for a, b in zip(g_obj, g_hand))


# ------------------------------------------------------------------------------------------------------
# finite-difference tangents against torch.func.jvp
# ------------------------------------------------------------------------------------------------------
def _xhat_path(tr, net, x, z, y):
    """r (B,) -> x̂(x_r, r) along the trajectory x_r = α(r) z + γ(r) x (the f^x of ucgm.md §1.3)."""
    return lambda r: tr.predict(net, tr.interpolate(x, z, r), r, y)[0]


def _derivatives(f, t, order):
    """d^k f(t + s)/ds^k at s = 0 (k = 1..order) for all rows at once, by nested forward-mode jvp."""
    one = torch.ones_like(t)
    outs = []
    g = f
    for _ in range(order):
        g = (lambda h: (lambda r: torch.func.jvp(h, (r,), (one,))[1]))(g)
        outs.append(g(t))
    return outs


def _derivative_at(tr, net, x, z, y, times, order):
    """The order-th derivative of f^x at each time row of ``times`` (K, B), in one batched jvp call: (K, B, D)."""
    k = times.shape[0]
    f = _xhat_path(tr, net, x.repeat(k, 1), z.repeat(k, 1), y.repeat(k))
    with torch.no_grad():
        return _derivatives(f, times.reshape(-1), order)[-1].reshape(k, *x.shape)


def _recovered_tangent(obj, tr, net, x, z, y, t):
    """Δ recovered from the objective's target: F* = F − (α/den)·(4/sin(1.57t))·Δ (no clip active)."""
    draws = {"t": t, "z": z, "drop": torch.zeros(len(t), dtype=torch.bool)}
    F, target, logs = obj.predict_and_target(net, x, y, draws)
    assert float(logs["clip_frac"]) == 0.0
    tt = t[:, None]
    coef = tr.alpha_in(tt) / tr.den(tt) * 4 / torch.sin(tt * 1.57)
    return (F.detach() - target) / coef


@pytest.mark.parametrize("transport", sorted(TRANSPORTS))
def test_lambda1_central_difference_matches_jvp(transport):
    """λ = 1: Δ = [f(t+ε) − f(t−ε)]/(2ε), ε = 0.005. Taylor: Δ − f'(t) = ε²/6·f'''(ξ), ξ ∈ [t−ε, t+ε], so
    |Δ − f'| ≤ ε²/6·max|f'''| (+ float64 rounding ~1e-16·|f|/ε, negligible). max|f'''| over the 2ε interval is
    taken as 1.5·max(|f'''(t−ε)|, |f'''(t)|, |f'''(t+ε)|) (f''' varies by far less than 50 % over 0.01), and the
    bound is also checked to be *tight*: the observed error is within a factor of 3 of ε²/6·|f'''(t)| in the
    median (so the check cannot pass by a loose bound). Catches sign and orientation errors of any transport."""
    torch.manual_seed(1)
    net = SmoothMLP(dim=4, num_classes=3).double()
    tr = build_transport(transport)
    x = torch.randn(32, 4, dtype=torch.float64)
    z = torch.randn(32, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (32,))
    t = torch.linspace(0.2, 0.8, 32, dtype=torch.float64)
    obj = UCGMObjective(transport, consistc_ratio=1.0, clip=1e9)
    delta = _recovered_tangent(obj, tr, net, x, z, y, t)
    d1 = _derivative_at(tr, net, x, z, y, t[None], 1)[0]
    d3 = _derivative_at(tr, net, x, z, y, torch.stack([t - obj.fd_eps, t, t + obj.fd_eps]), 3).abs()
    err = (delta - d1).abs()
    bound = obj.fd_eps**2 / 6 * 1.5 * d3.amax(0) + 1e-12 * (1 + d1.abs())
    assert bool((err <= bound).all()), f"max err/bound {(err / bound).max():.3g}"
    ratio = (err / (obj.fd_eps**2 / 6 * d3[1])).median()
    assert 1 / 3 < float(ratio) < 3, float(ratio)
    # the check discriminates: a sign-flipped tangent (an orientation error) would break the bound almost everywhere
    assert float(((-delta - d1).abs() > bound).double().mean()) > 0.95


@pytest.mark.parametrize("transport", ["linear", "trigflow", "edm"])
def test_backward_difference_approaches_central_difference(transport):
    """λ ∈ (0, 1): Δ_λ = [f(t) − f(λt)]/h with h = (1−λ)t; Taylor: Δ_λ − f'(t) = −(h/2)·f''(ξ), ξ ∈ [λt, t], so
    |Δ_λ − f'| ≤ (h/2)·max|f''| (max over 5 points of [λt, t], ×1.5), and Δ_λ → the λ = 1 central difference
    at first order: |Δ_λ − Δ_cd| ≤ (h/2)·max|f''| + ε²/6·max|f'''| (checked for λ = 0.9, 0.99, 0.999), the error
    shrinking ~10× per 10× smaller 1−λ."""
    torch.manual_seed(2)
    net = SmoothMLP(dim=4, num_classes=3).double()
    tr = build_transport(transport)
    x = torch.randn(16, 4, dtype=torch.float64)
    z = torch.randn(16, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (16,))
    t = torch.linspace(0.3, 0.8, 16, dtype=torch.float64)
    cd = _recovered_tangent(UCGMObjective(transport, consistc_ratio=1.0, clip=1e9), tr, net, x, z, y, t)
    d3 = _derivative_at(tr, net, x, z, y, t[None], 3)[0]
    errs = []
    for lam in (0.9, 0.99, 0.999):
        bd = _recovered_tangent(UCGMObjective(transport, consistc_ratio=lam, clip=1e9), tr, net, x, z, y, t)
        h = (1 - lam) * t
        d2max = _derivative_at(tr, net, x, z, y, torch.stack([t - s * h for s in torch.linspace(0, 1, 5).tolist()]),
                               2).abs().amax(0)
        bound = h[:, None] / 2 * 1.5 * d2max + 0.005**2 / 6 * 1.5 * d3.abs() + 1e-10
        err = (bd - cd).abs()
        assert bool((err <= bound).all()), f"λ={lam}: max err/bound {(err / bound).max():.3g}"
        errs.append(float(err.median()))
    assert errs[1] < errs[0] / 5 and errs[2] < errs[1] / 5, errs


# ------------------------------------------------------------------------------------------------------
# enhanced target, label drop, options
# ------------------------------------------------------------------------------------------------------
class ConstNet(nn.Module):
    """F = c_y (a per-class constant vector), so x̂ and ẑ are known in closed form."""

    def __init__(self, consts):
        super().__init__()
        self.c = nn.Parameter(torch.as_tensor(consts, dtype=torch.float32))
        self.num_classes = self.c.shape[0] - 1

    def forward(self, x, t, y):
        return self.c[y] + 0 * x


@pytest.mark.parametrize("style", ["ft-vs-fe", "fc-vs-fe", "fc-vs-xz"])
def test_enhanced_target_rules_small_case(style):
    """Linear, λ = 0, ζ = 0.5, range (0, 0.75), 4 rows: t = [0.2, 0.5, 0.9, 0.3], the last row dropped.
    For Linear x̂ = x_t − tF and ẑ = x_t + (1−t)F. Expected (ucgm.md §1.4): rows 0, 1 (in range, kept)
    x̃ = x + ζ(pc_x − ref_x); row 2 (out of range) x̃ = (x + pc_x)/2; row 3 (dropped) x̃ = (x + ref_x)/2;
    the same for z̃; F* = z̃ − x̃. pc/ref: ft-vs-fe = online(y) vs teacher(∅); fc-vs-fe = teacher(y) vs
    teacher(∅); fc-vs-xz = teacher(y) vs the ground truth (x, z)."""
    online = ConstNet([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [-1.0, -1.0]])  # 3 classes + null
    teacher_net = ConstNet([[2.0, 0.0], [0.0, 2.0], [1.0, 1.0], [0.3, -0.2]])
    obj = UCGMObjective("linear", enhanced_ratio=0.5, enhanced_style=style, lab_drop_ratio=0.25)
    x = torch.tensor([[1.0, 2.0], [0.5, -1.0], [-2.0, 0.0], [0.0, 1.0]])
    z = torch.tensor([[0.1, -0.3], [1.0, 1.0], [0.0, 2.0], [-1.0, 0.5]])
    y = torch.tensor([0, 1, 2, 1])
    t = torch.tensor([0.2, 0.5, 0.9, 0.3])
    drop = obj.draw(x, y, 3)["drop"]
    assert drop.tolist() == [False, False, False, True]  # "last": round(0.25·4) = 1 row
    _, target, _ = obj.predict_and_target(online, x, y, {"t": t, "z": z, "drop": drop}, Teacher(teacher_net, "frozen"))

    tb = t[:, None]
    x_t = tb * z + (1 - tb) * x
    yd = torch.tensor([0, 1, 2, 3])

    def est(net, labels):
        F = net.c[labels].detach()
        return x_t - tb * F, x_t + (1 - tb) * F

    null = torch.full_like(yd, 3)
    if style == "ft-vs-fe":
        (pc_x, pc_z), (rf_x, rf_z) = est(online, yd), est(teacher_net, null)
    elif style == "fc-vs-fe":
        (pc_x, pc_z), (rf_x, rf_z) = est(teacher_net, yd), est(teacher_net, null)
    else:
        (pc_x, pc_z), (rf_x, rf_z) = est(teacher_net, yd), (x, z)
    xs, zs = x.clone(), z.clone()
    for i, rule in enumerate(["in", "in", "out", "drop"]):
        for v, pc, rf in ((xs, pc_x, rf_x), (zs, pc_z, rf_z)):
            v[i] = {"in": v[i] + 0.5 * (pc[i] - rf[i]), "out": (v[i] + pc[i]) / 2, "drop": (v[i] + rf[i]) / 2}[rule]
    torch.testing.assert_close(target, zs - xs, rtol=0, atol=1e-6)


def test_zeta_remap_warns_only_for_lambda0():
    with pytest.warns(UserWarning, match="remapped"):
        obj = UCGMObjective("linear", enhanced_ratio=2.0, enhanced_style="ft-vs-fe")
    assert obj.enhanced_ratio == 0.5 and obj.enhanced_ratio_given == 2.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        obj = UCGMObjective("linear", consistc_ratio=1.0, enhanced_ratio=2.0, enhanced_style="fc-vs-xz")
    assert obj.enhanced_ratio == 2.0


def test_bad_options_fail_early():
    with pytest.raises(ValueError, match="enhanced_style"):
        UCGMObjective(enhanced_ratio=0.5)
    with pytest.raises(ValueError, match="consistc_ratio"):
        UCGMObjective(consistc_ratio=1.5)
    with pytest.raises(ValueError, match="scaled_cbl_eps"):
        UCGMObjective(loss="mse", scaled_cbl_eps=5.0)
    with pytest.raises(ValueError, match="teacher"):
        obj = UCGMObjective(enhanced_ratio=0.5, enhanced_style="ft-vs-fe")
        obj.loss(TinyNet(), torch.randn(4, 3, 4, 4), torch.zeros(4, dtype=torch.long))


def test_label_drop_by_mask():
    """'last' drops round(ratio·B) trailing rows (Python rounding, as unigen.py:230) and never all of them when
    that count is 0 (the reference's c[-0:] pitfall); 'random' is Bernoulli(ratio) on the generator."""
    x = torch.zeros(4, 2)
    y = torch.arange(4)
    obj = UCGMObjective(lab_drop_ratio=0.1)  # round(0.4) = 0
    assert not obj.draw(x, y, 10)["drop"].any()
    assert UCGMObjective(lab_drop_ratio=0.5).draw(x, y, 10)["drop"].tolist() == [False, False, True, True]
    assert UCGMObjective(lab_drop_ratio=0.1).draw(torch.zeros(15, 2), torch.arange(15), 10)["drop"].sum() == 2
    r = UCGMObjective(lab_drop_ratio=0.1, lab_drop="random")
    d = torch.cat([r.draw(torch.zeros(1000, 2), torch.zeros(1000, dtype=torch.long), 10,
                          torch.Generator().manual_seed(s))["drop"] for s in range(4)])
    # Binomial(4000, 0.1): mean 400, sd 19; ±5 sd
    assert 305 < int(d.sum()) < 495
    assert not UCGMObjective().draw(x, None, None)["drop"].any()  # unconditional


@pytest.mark.parametrize("shape", [(8, 3, 4, 4), (8, 6), (8, 2)])
def test_shapes_and_per_sample_cosine_loss(shape):
    """(B, C, H, W), (N, D), (B, 2) all give a finite loss; the cosine-direction loss and mean_flat keep the
    batch dimension (ucgm.md §5.2 T6: the reference's mean_flat of a 1-D tensor averages over the batch)."""
    obj = UCGMObjective("linear", consistc_ratio=1.0, wt_cosine_loss=True, scaled_cbl_eps=0.0)
    a, b = torch.randn(shape), torch.randn(shape)
    per = obj.per_sample_loss(a, b)
    assert per.shape == (shape[0],)
    assert mean_flat(torch.arange(4.0)).tolist() == [0.0, 1.0, 2.0, 3.0]
    for i in range(shape[0]):
        one = obj.per_sample_loss(a[i:i + 1], b[i:i + 1])
        torch.testing.assert_close(one[0], per[i])
    net = TinyNet(channels=3) if len(shape) == 4 else SmoothMLP(dim=shape[1], num_classes=5)
    loss, logs = obj.loss(net, torch.randn(shape), torch.randint(0, 5, (shape[0],)),
                          generator=torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and math.isfinite(float(loss.detach()))
    loss.backward()


def test_tokens_equal_images_of_1x1():
    """The objective on (N, D) tokens equals the objective on (N, D, 1, 1) images with the same net."""
    net = SmoothMLP(dim=6, num_classes=5)

    class As4D(nn.Module):
        num_classes = 5

        def forward(self, x, t, y):
            return net(x.flatten(1), t, y)[:, :, None, None]

    obj = UCGMObjective("trigflow", consistc_ratio=0.5, wt_cosine_loss=True, scaled_cbl_eps=5.0,
                        enhanced_ratio=1.5, enhanced_style="fc-vs-fe")
    x = torch.randn(8, 6)
    y = torch.randint(0, 5, (8,))
    l2, _ = obj.loss(net, x, y, generator=torch.Generator().manual_seed(1), teacher=Teacher(net, "online"))
    l4, _ = obj.loss(As4D(), x[:, :, None, None], y, generator=torch.Generator().manual_seed(1),
                     teacher=Teacher(As4D(), "online"))
    torch.testing.assert_close(l2, l4, rtol=1e-6, atol=1e-7)
