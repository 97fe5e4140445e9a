"""Transports of the UCGM family: x_t = α(t)·z + γ(t)·x and a network target F* = α̂(t)·z + γ̂(t)·x.

Reference: UCGM v2 (cccvs/UCGM @ ae74912), ``methodes/transports/*.py`` for the five schedules and
``methodes/unigen.py:185-209`` for the orientation normalisation and the F -> (x̂, ẑ) conversion.
Reference names: ``alpha_in`` = α, ``gamma_in`` = γ, ``alpha_to`` = α̂, ``gamma_to`` = γ̂.

Internal convention (all of contgen's transport code): **t = 1 is noise, t = 0 is data**. A transport whose
own ("native") convention is the opposite (ReLinear: t = 0 noise) is normalised exactly as the reference
does it (unigen.py:185-192, 205-206): its α↔γ and α̂↔γ̂ are swapped, the network is fed ``1 - t`` and its
output is multiplied by -1. Pretrained networks therefore keep their native time convention.

Everything is shape-agnostic: ``t`` is a scalar or a (B,) tensor and is broadcast against images
(B, C, H, W), tokens (N, D) or 2-D points (B, 2) by :func:`expand_time`.
"""

from __future__ import annotations

import torch

# π/2 is hard-coded as 1.57 in the reference (trigflow.py, triglinear.py; also unigen.py's cosine weight
# and 4/sin(1.57t) factor). Kept so that released checkpoints and fixtures match exactly.
HALF_PI_REF = 1.57


def expand_time(t, like: torch.Tensor) -> torch.Tensor:
    """``t`` shaped (B, 1, ..., 1) (or (1, ..., 1) for a scalar) to broadcast against ``like``.

    Accepts a Python float, a 0-d tensor, a (B,) tensor, or a tensor already of ``like.ndim`` dims.
    The dtype of a tensor ``t`` is kept (the caller decides the precision of the coefficients).
    """
    t = torch.as_tensor(t, device=like.device)
    if t.ndim == 0:
        return t.reshape([1] * like.ndim)
    if t.ndim == like.ndim:
        return t
    if t.ndim == 1 and t.shape[0] == like.shape[0]:
        return t.reshape(t.shape[0], *([1] * (like.ndim - 1)))
    raise ValueError(f"time of shape {tuple(t.shape)} does not broadcast against {tuple(like.shape)}")


class Transport:
    """Base class. Subclasses define the *native* schedule ``_alpha_in, _gamma_in, _alpha_to, _gamma_to``
    exactly as the reference file; the public ``alpha_in`` ... are the orientation-normalised ones."""

    name = "base"

    # -- native schedule (reference convention), overridden by subclasses ---------------------------
    def _alpha_in(self, t):
        raise NotImplementedError

    def _gamma_in(self, t):
        raise NotImplementedError

    def _alpha_to(self, t):
        raise NotImplementedError

    def _gamma_to(self, t):
        raise NotImplementedError

    def __init__(self):
        # Orientation check of unigen.py:185-192 (tolerance 0.005): γ(0) ≈ 0 means t = 0 is noise in the
        # native convention ("integ_st = 0"); α(0) ≈ 0 means t = 1 is noise ("integ_st = 1").
        zero = torch.zeros((), dtype=torch.float64)
        if self._gamma_in(zero).abs() < 0.005:
            self.flipped = True
        elif self._alpha_in(zero).abs() < 0.005:
            self.flipped = False
        else:
            raise ValueError(f"{type(self).__name__}: neither α(0) nor γ(0) is ~0; cannot orient the transport")

    # -- normalised schedule (internal t = 1 is noise) ----------------------------------------------
    # The reference swaps the *functions* (α <- γ, α̂ <- γ̂) and evaluates them at the same t; for ReLinear
    # this is the same as the native schedule at 1 - t, which is what makes "feed 1 - t, negate F" exact.
    def alpha_in(self, t):
        t = torch.as_tensor(t)
        return self._gamma_in(t) if self.flipped else self._alpha_in(t)

    def gamma_in(self, t):
        t = torch.as_tensor(t)
        return self._alpha_in(t) if self.flipped else self._gamma_in(t)

    def alpha_to(self, t):
        t = torch.as_tensor(t)
        return self._gamma_to(t) if self.flipped else self._alpha_to(t)

    def gamma_to(self, t):
        t = torch.as_tensor(t)
        return self._alpha_to(t) if self.flipped else self._gamma_to(t)

    def den(self, t):
        """α·γ̂ − γ·α̂ (the reference's ``dent``, unigen.py:203); never 0 for the transports here."""
        return self.alpha_in(t) * self.gamma_to(t) - self.gamma_in(t) * self.alpha_to(t)

    # -- network time and sign ---------------------------------------------------------------------
    @property
    def output_sign(self) -> int:
        """+1, or -1 for flipped transports (unigen.py:206: ``(-1) ** (1 - integ_st) * model(...)``)."""
        return -1 if self.flipped else 1

    def native_time(self, t):
        """The time the network is fed: ``1 - t`` for flipped transports (unigen.py:205), else ``t``."""
        return 1 - t if self.flipped else t

    # -- paths, targets, estimates -----------------------------------------------------------------
    def _coef(self, fn, t, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return fn(expand_time(t, like)).to(dtype)

    def interpolate(self, x: torch.Tensor, z: torch.Tensor, t) -> torch.Tensor:
        """x_t = α(t)·z + γ(t)·x (unigen.py:233-234); coefficients computed in t's dtype, cast to x's."""
        dtype = torch.result_type(x, z)
        return self._coef(self.alpha_in, t, x, dtype) * z + self._coef(self.gamma_in, t, x, dtype) * x

    def target(self, x: torch.Tensor, z: torch.Tensor, t) -> torch.Tensor:
        """F* = α̂(t)·z + γ̂(t)·x (unigen.py:297 with the un-enhanced x, z)."""
        dtype = torch.result_type(x, z)
        return self._coef(self.alpha_to, t, x, dtype) * z + self._coef(self.gamma_to, t, x, dtype) * x

    def estimates(self, F: torch.Tensor, x_t: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
        """(x̂, ẑ) from a (sign-corrected) network output F (unigen.py:203, 207-208):

        x̂ = (α·F − α̂·x_t) / den,   ẑ = (γ̂·x_t − γ·F) / den,   den = α·γ̂ − γ·α̂.
        With F = F* = α̂z + γ̂x this gives x̂ = x and ẑ = z exactly (up to rounding).
        """
        dtype = torch.result_type(F, x_t)
        tt = expand_time(t, x_t)
        a, g, at, gt = self.alpha_in(tt), self.gamma_in(tt), self.alpha_to(tt), self.gamma_to(tt)
        den = (a * gt - g * at).to(dtype)
        a, g, at, gt = a.to(dtype), g.to(dtype), at.to(dtype), gt.to(dtype)
        x_hat = (a * F - at * x_t) / den
        z_hat = (gt * x_t - g * F) / den
        return x_hat, z_hat

    def model_output(self, net, x_t: torch.Tensor, t, y, **cond) -> torch.Tensor:
        """F = output_sign · net(x_t, native_time(t) as (B,), y, **cond) (unigen.py:204-206).

        ``t`` may be a scalar (shared by the batch), (B,) or (B, 1, ..., 1); the network always gets (B,).
        ``cond`` is passed through (Shortcut's step ``level``).
        """
        t = torch.as_tensor(t, device=x_t.device)
        t = t.reshape(-1)
        if t.numel() == 1:
            t = t.expand(x_t.shape[0])
        F = net(x_t, self.native_time(t), y, **cond)
        return -F if self.flipped else F

    def predict(self, net, x_t: torch.Tensor, t, y):
        """(x̂, ẑ, F) of ``net`` at (x_t, t) — the reference's ``UCGMTS.forward`` without ``dent``."""
        F = self.model_output(net, x_t, t, y)
        x_hat, z_hat = self.estimates(F, x_t, t)
        return x_hat, z_hat, F

    def __repr__(self) -> str:
        return f"{type(self).__name__}(flipped={self.flipped})"


class Linear(Transport):
    """Rectified flow / SiT / REPA(-E): x_t = t·z + (1−t)·x, F = z − x (transports/linear.py)."""

    name = "linear"

    def _alpha_in(self, t):
        return t

    def _gamma_in(self, t):
        return 1 - t

    def _alpha_to(self, t):
        return torch.ones_like(t)

    def _gamma_to(self, t):
        return -torch.ones_like(t)


class ReLinear(Transport):
    """LightningDiT / DDT convention: native t = 0 is noise, x_s = (1−s)·z + s·x, F = x − z
    (transports/relinear.py). Normalised to Linear internally; the net gets 1 − t and F is negated."""

    name = "relinear"

    def _alpha_in(self, t):
        return 1 - t

    def _gamma_in(self, t):
        return t

    def _alpha_to(self, t):
        return -torch.ones_like(t)

    def _gamma_to(self, t):
        return torch.ones_like(t)


class ShortcutLinear(Transport):
    """Shortcut models' path (targets_shortcut.py:38, 94-95): native s = 0 is noise, x_s = (1 − (1 − ε)s)·z + s·x and
    v = x − (1 − ε)·z with ε = 1e-5, so that x_0 = z and x_1 ≈ x. The network is fed s = 1 − t and outputs v.

    Unlike ReLinear, the ε makes the schedule asymmetric, so the reference's α↔γ swap would put ε on the data
    coefficient: this one is normalised by evaluating the native schedule at s = 1 − t and negating the targets
    (d/dt = −d/ds). For the dyadic times Shortcut trains on, 1 − (1 − s) = s exactly, so paths and targets equal the
    reference's bit for bit (F = −v, x_t − h·F = x_s + h·v).
    """

    name = "shortcut"
    eps = 1e-5

    def _alpha_in(self, s):
        return 1 - (1 - self.eps) * s

    def _gamma_in(self, s):
        return s

    def _alpha_to(self, s):
        return -(1 - self.eps) * torch.ones_like(s)

    def _gamma_to(self, s):
        return torch.ones_like(s)

    def alpha_in(self, t):
        return self._alpha_in(1 - torch.as_tensor(t))

    def gamma_in(self, t):
        return self._gamma_in(1 - torch.as_tensor(t))

    def alpha_to(self, t):
        return -self._alpha_to(1 - torch.as_tensor(t))

    def gamma_to(self, t):
        return -self._gamma_to(1 - torch.as_tensor(t))


class TrigFlow(Transport):
    """sCM TrigFlow with σ_d = 1: (sin, cos) path, F = cos·z − sin·x (transports/trigflow.py, π/2 as 1.57)."""

    name = "trigflow"

    def _alpha_in(self, t):
        return torch.sin(t * HALF_PI_REF)

    def _gamma_in(self, t):
        return torch.cos(t * HALF_PI_REF)

    def _alpha_to(self, t):
        return torch.cos(t * HALF_PI_REF)

    def _gamma_to(self, t):
        return -torch.sin(t * HALF_PI_REF)


class TrigLinear(Transport):
    """Cosine path with the rectified-flow target z − x (transports/triglinear.py, π/2 as 1.57)."""

    name = "triglinear"

    def _alpha_in(self, t):
        return torch.sin(t * HALF_PI_REF)

    def _gamma_in(self, t):
        return torch.cos(t * HALF_PI_REF)

    def _alpha_to(self, t):
        return torch.ones_like(t)

    def _gamma_to(self, t):
        return -torch.ones_like(t)


class EDM(Transport):
    """EDM with σ_d = 0.5 (transports/edm.py): ln σ = 4·(2.68t − 1.59), s = √(σ² + 0.25);
    α = σ/s, γ = 1/s (the input is already c_in-scaled), α̂ = −0.5/s, γ̂ = 2σ/s (EDM's F-target)."""

    name = "edm"

    @staticmethod
    def _sigma(t):
        return ((t * 2.68 - 1.59) * 4).exp()

    def _alpha_in(self, t):
        s = self._sigma(t)
        return s / (s**2 + 0.25) ** 0.5

    def _gamma_in(self, t):
        s = self._sigma(t)
        return 1 / (s**2 + 0.25) ** 0.5

    def _alpha_to(self, t):
        s = self._sigma(t)
        return -0.5 / (s**2 + 0.25) ** 0.5

    def _gamma_to(self, t):
        s = self._sigma(t)
        return 2 * s / (s**2 + 0.25) ** 0.5


TRANSPORTS: dict[str, type[Transport]] = {
    "linear": Linear,
    "relinear": ReLinear,
    "trigflow": TrigFlow,
    "triglinear": TrigLinear,
    "edm": EDM,
    "shortcut": ShortcutLinear,
}


def build_transport(name: str | Transport) -> Transport:
    """Transport by name; case-insensitive so the reference's ``transport.type`` values (``Linear``,
    ``ReLinear``, ``TrigFlow``, ``TrigLinear``, ``EDM``) port unchanged. A Transport instance passes through."""
    if isinstance(name, Transport):
        return name
    key = str(name).lower()
    if key not in TRANSPORTS:
        raise ValueError(f"unknown transport {name!r}; choose one of {sorted(TRANSPORTS)}")
    return TRANSPORTS[key]()
