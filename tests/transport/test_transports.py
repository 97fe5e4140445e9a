"""Transports (contgen/transport/transports.py): exact (x̂, ẑ) recovery, shapes, orientation, reference parity.

Parity data: tests/fixtures/reference/ucgm/sampling_transports.pt, written by
tests/fixtures/make_ucgm_sampling_fixtures.py from the reference's own ``UCGMTS`` (cccvs/UCGM @ ae74912).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from contgen.transport import TRANSPORTS, Linear, ReLinear, build_transport, expand_time
from tests.transport.toy_denoiser import ToyDenoiser

pytestmark = pytest.mark.usefixtures("one_thread")

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "reference" / "ucgm"
SHAPES = [(4, 3, 5, 5), (7, 6), (9, 2)]  # images (B, C, H, W), tokens (N, D), 2-D points (B, 2)
REF_NAMES = {"linear": "Linear", "relinear": "ReLinear", "trigflow": "TrigFlow", "triglinear": "TrigLinear",
             "edm": "EDM"}


def _draw(shape, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=dtype)
    z = torch.randn(shape, generator=g, dtype=dtype)
    t = (0.01 + 0.98 * torch.rand(shape[0], generator=g, dtype=torch.float64)).to(dtype)  # t in (0.01, 0.99)
    return x, z, t


@pytest.mark.parametrize("name", sorted(TRANSPORTS))
@pytest.mark.parametrize("shape", SHAPES)
def test_estimates_recover_x_and_z_from_the_target(name, shape):
    """F = F* = α̂z + γ̂x at x_t = αz + γx gives x̂ = x, ẑ = z. In float64 the only error is rounding: the
    coefficients are O(1) (|α|, |γ|, |α̂|, |γ̂| <= 2 and |den| >= 1 for all five: Linear/ReLinear/TrigFlow |den| = 1,
    TrigLinear sin + cos >= 1 on [0, 1.57], EDM den = 2), so 1e-12 is ~1e4 ulps of headroom; float32 gets 1e-5."""
    tr = build_transport(name)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        x, z, t = _draw(shape, seed=len(shape) + 10 * sorted(TRANSPORTS).index(name), dtype=dtype)
        x_t = tr.interpolate(x, z, t)
        x_hat, z_hat = tr.estimates(tr.target(x, z, t), x_t, t)
        assert x_hat.shape == x.shape and x_hat.dtype == dtype
        torch.testing.assert_close(x_hat, x, rtol=0, atol=tol)
        torch.testing.assert_close(z_hat, z, rtol=0, atol=tol)
        assert (tr.den(t).abs() >= 1 - 1e-6).all()


@pytest.mark.parametrize("name", sorted(TRANSPORTS))
def test_internal_convention_t1_is_noise(name):
    """After normalisation every transport has α(0) ≈ 0 (x_0 is data) and γ(1) small (x_1 is mostly noise):
    exactly 0 for Linear/ReLinear, 1e-5 for Shortcut's (1 − 1e-5) path, cos(1.57) = 8e-4 for the trig ones,
    1/s(1) = 0.013 for EDM. ReLinear and Shortcut are natively t = 0 = noise (flipped)."""
    tr = build_transport(name)
    assert float(tr.alpha_in(torch.tensor(0.0, dtype=torch.float64)).abs()) < 0.005
    assert float(tr.gamma_in(torch.tensor(1.0, dtype=torch.float64)).abs()) < 0.02
    flipped = name in ("relinear", "shortcut")
    assert tr.flipped == flipped and tr.output_sign == (-1 if flipped else 1)


def test_expand_time_shapes():
    for shape in SHAPES:
        like = torch.zeros(shape)
        t = torch.rand(shape[0])
        e = expand_time(t, like)
        assert e.shape == (shape[0],) + (1,) * (len(shape) - 1) and (e.reshape(-1) == t).all()
        assert expand_time(0.5, like).shape == (1,) * len(shape)
        assert expand_time(e, like) is e
    with pytest.raises(ValueError):
        expand_time(torch.rand(3), torch.zeros(4, 2))


def test_relinear_with_its_native_net_equals_linear():
    """Orientation: a ReLinear-native network g(x, s) = −f(x, 1 − s) (t = 0 noise, output x − z) is the same model
    as the Linear network f; ReLinear feeds it 1 − t and negates its output, so every quantity is identical."""
    net = ToyDenoiser(channels=3, num_classes=4).double()
    seen = []

    def f(x, t, y):
        return net(x, t, y)

    def g(x, s, y):
        seen.append(s)
        return -net(x, 1 - s, y)

    x, z, t = _draw((4, 3, 5, 5), seed=3)
    y = torch.tensor([0, 1, 2, 4])
    lin, rel = Linear(), ReLinear()
    torch.testing.assert_close(rel.interpolate(x, z, t), lin.interpolate(x, z, t), rtol=0, atol=0)
    torch.testing.assert_close(rel.target(x, z, t), lin.target(x, z, t), rtol=0, atol=0)
    x_t = lin.interpolate(x, z, t)
    for a, b in zip(rel.predict(g, x_t, t, y), lin.predict(f, x_t, t, y)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-15)  # 1 − (1 − t) may round t by one ulp
    torch.testing.assert_close(seen[0], 1 - t, rtol=0, atol=0)  # the network saw its native time, shape (B,)


def test_model_output_feeds_batch_time_for_a_scalar_t():
    calls = []

    def net(x, t, y):
        calls.append(t)
        return torch.zeros_like(x)

    x = torch.zeros(5, 2)
    Linear().model_output(net, x, torch.tensor(0.3), None)
    ReLinear().model_output(net, x, 0.3, None)
    assert calls[0].shape == (5,) and torch.allclose(calls[0], torch.full((5,), 0.3))
    assert torch.allclose(calls[1], torch.full((5,), 0.7))


def test_build_transport_names():
    for key, ref in REF_NAMES.items():
        assert type(build_transport(ref)) is TRANSPORTS[key]  # the reference's YAML spelling works
    tr = Linear()
    assert build_transport(tr) is tr
    with pytest.raises(ValueError, match="unknown transport"):
        build_transport("random")


def test_parity_with_reference_ucgmts():
    """α, γ, α̂, γ̂ after the reference's orientation swap, and ``UCGMTS.forward``'s (x̂, ẑ, F) on a toy denoiser,
    against contgen at float32. Same float32 operations on the same inputs: the schedules must agree to 1 ulp
    (2e-7 relative, |values| <= 2.1); x̂, ẑ are a division by den (|den| >= 1) of O(1) terms, so 1e-6."""
    data = torch.load(FIXTURES / "sampling_transports.pt", weights_only=True)
    toy = ToyDenoiser(data["toy"]["channels"], data["toy"]["num_classes"], data["toy"]["hidden"])
    toy.load_state_dict(data["toy"]["state_dict"])
    t, x_t, y = data["t"], data["x_t"], data["y"]
    assert set(data["transports"]) == set(REF_NAMES.values())
    for key, ref_name in REF_NAMES.items():
        ref = data["transports"][ref_name]
        tr = build_transport(key)
        assert tr.flipped == (ref["integ_st"] == 0)
        for fn in ("alpha_in", "gamma_in", "alpha_to", "gamma_to"):
            torch.testing.assert_close(getattr(tr, fn)(t).expand_as(t), ref[fn], rtol=2e-7, atol=1e-7,
                                       msg=f"{key}.{fn}")
        with torch.no_grad():
            x_hat, z_hat, F = tr.predict(toy, x_t, t, y)
        torch.testing.assert_close(F, ref["F"], rtol=0, atol=1e-6, msg=f"{key} F")
        torch.testing.assert_close(x_hat, ref["x_hat"], rtol=1e-6, atol=1e-6, msg=f"{key} x_hat")
        torch.testing.assert_close(z_hat, ref["z_hat"], rtol=1e-6, atol=1e-6, msg=f"{key} z_hat")
