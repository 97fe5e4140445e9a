"""Solvers of the transport family: UCGM-S (the unified sampler) and plain Euler / Heun on the same grid.

Reference: UCGM v2 (cccvs/UCGM @ ae74912) ``methodes/unigen.py`` ``UCGMTS.sampling_loop`` (L310-451) and the
networks' ``forward_with_cfg`` (``networks/sit.py:296-324``, ``networks/tit.py:506-533``), which ``eval.py``
(L131, L185-227) uses for guidance. Internal time: t = 1 noise, t = 0 data (see ``transports.py``).

Design (contgen rules):
- The time grid, every schedule coefficient and every guidance-interval decision are computed on the host in
  float64 *before* the loop, from numbers known up front, so a sampling step never reads a device value back
  (no host syncs) and the network always sees the same shapes.
- Solver state is float64 (as the reference, L390); the network is called in the dtype of the initial noise
  (time fed in float32 when that dtype is half precision, as the reference always feeds float32 time).
  The F -> (x̂, ẑ) conversion is done in float64 from the upcast network output (the reference does it in
  float32, L207-208; the difference is fp32 rounding, see the parity tests).
- Every fresh noise draw takes the caller's ``torch.Generator`` (or a ``noise_fn`` hook used by the parity
  tests to replay the reference's recorded draws). The draws are made before the loop, in the loop's order (the
  network draws nothing), so the loop is a pure function of (noise, labels, draws): on a GPU under
  ``module.cuda_graphs`` it replays as one CUDA graph per shape (:func:`replay_or_call`), with the same numbers.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from contgen.transport.transports import Transport, build_transport
from contgen.utils import cuda_graphs

RETURN_MODES = ("last_xhat", "final_x", "stack")


# ------------------------------------------------------------------------------------------------------
# Time grid
# ------------------------------------------------------------------------------------------------------
def kumaraswamy_transform(t: torch.Tensor, a: float, b: float, c: float) -> torch.Tensor:
    """(1 − (1 − t^a)^b)^c (unigen.py:198-199); (1, 1, 1) is the identity."""
    return (1 - (1 - t**a) ** b) ** c


def time_grid(steps: int, time_dist_ctrl: Sequence[float] = (1.0, 1.0, 1.0),
              rfba_gap_steps: Sequence[float] = (0.0, 0.0)) -> torch.Tensor:
    """The ``steps + 1`` internal times t_0 > ... > t_{steps-1} > t_steps = 0 of unigen.py:384-391 (float64, CPU).

    ``linspace(start_gap, 1 − end_gap, steps)`` (or, when end_gap == 0, the first ``steps`` points of
    ``linspace(start_gap, 1, steps + 1)``), warped by Kumaraswamy(a, b, c) = ``time_dist_ctrl``, reflected
    t -> 1 − t, then 0 appended. E.g. steps 2, gaps (0.001, 0.5), (1, 1, 1) -> [0.999, 0.5, 0].
    (The reference casts the grid to the noise dtype, i.e. float32; contgen keeps float64.)
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    start_gap, end_gap = float(rfba_gap_steps[0]), float(rfba_gap_steps[1])
    if not (0.0 <= start_gap < 1.0 and 0.0 <= end_gap < 1.0):
        raise ValueError(f"rfba_gap_steps must lie in [0, 1), got {tuple(rfba_gap_steps)}")
    a, b, c = (float(v) for v in time_dist_ctrl)
    if min(a, b, c) <= 0:
        raise ValueError(f"time_dist_ctrl (Kumaraswamy a, b, c) must be positive, got {tuple(time_dist_ctrl)}")
    if end_gap == 0.0:
        u = torch.linspace(start_gap, 1.0, steps + 1, dtype=torch.float64)[:-1]
    else:
        u = torch.linspace(start_gap, 1.0 - end_gap, steps, dtype=torch.float64)
    u = kumaraswamy_transform(u, a, b, c)
    return torch.cat([1 - u, torch.zeros(1, dtype=torch.float64)])


# ------------------------------------------------------------------------------------------------------
# Classifier-free guidance with a guidance interval
# ------------------------------------------------------------------------------------------------------
class CFGDenoiser:
    """Classifier-free guidance as the reference networks' ``forward_with_cfg`` (sit.py:296-324, tit.py:506-533).

    - ``cfg_scale`` w: guided = uncond + w·(cond − uncond), on the raw network output. The reference only
      guides when ``cfg_scale > 0`` (eval.py:131), so w <= 0 means *no guidance* (conditional output), which
      keeps its YAMLs' ``cfg_scale: 0.0`` meaning; w == 1 is the conditional output too and skips the second
      half of the batch.
    - Interval: guidance is applied iff lo <= t_native <= hi, both ends included, with t_native the time the
      network is fed (its native convention: 1 − t for ReLinear). Outside it one conditional pass of B rows.
    - Inside it cond and uncond go through the network once, as one batch of 2B rows (labels then the null
      class ``net.num_classes``).
    - ``channels``: guide only the first ``channels`` channels of dim 1 (the rest is the conditional output);
      None = all. The reference SiT/TiT guide ``in_channels`` (= all, since F has x's shape);
      LightningDiT guides the first 3 (lightningdit.py:483).
    """

    def __init__(self, net, cfg_scale: float = 1.0, cfg_interval: Sequence[float] = (0.0, 1.0),
                 channels: int | None = None, null_class: int | None = None):
        self.net = net
        self.cfg_scale = float(cfg_scale)
        self.cfg_interval = (float(cfg_interval[0]), float(cfg_interval[1]))
        self.channels = channels
        self.null_class = null_class

    @property
    def enabled(self) -> bool:
        return self.cfg_scale > 0.0 and self.cfg_scale != 1.0

    def in_interval(self, t_native: float) -> bool:
        """Host-side interval test on a Python float (the sampler precomputes it per step)."""
        lo, hi = self.cfg_interval
        return self.enabled and lo <= t_native <= hi

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None, guide: bool,
                 **cond: torch.Tensor) -> torch.Tensor:
        """F of ``net`` at (x, t native (B,), y, **cond); ``guide`` says whether this call is inside the interval.
        ``cond`` holds further per-row inputs (Shortcut's step ``level``), duplicated for the null half."""
        if not guide:
            return self.net(x, t, y, **cond)
        if y is None:
            raise ValueError("classifier-free guidance needs class labels y")
        null = self.null_class if self.null_class is not None else getattr(self.net, "num_classes", None)
        if null is None:
            raise ValueError("classifier-free guidance needs the null class: net.num_classes or null_class=")
        out = self.net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null)]),
                       **{k: torch.cat([v, v]) for k, v in cond.items()})
        cond, uncond = out.chunk(2)
        if self.channels is None:
            return uncond + self.cfg_scale * (cond - uncond)
        k = self.channels
        guided = uncond[:, :k] + self.cfg_scale * (cond[:, :k] - uncond[:, :k])
        return torch.cat([guided, cond[:, k:]], dim=1)


# ------------------------------------------------------------------------------------------------------
# Shared machinery
# ------------------------------------------------------------------------------------------------------
def replay_or_call(cache: cuda_graphs.GraphCache, loop: Callable[..., torch.Tensor], net, inputs: dict,
                   key: tuple) -> torch.Tensor:
    """``loop(**inputs)``: a sampling loop that reads only ``inputs`` and ``net``'s parameters. Replayed from
    ``cache`` as a CUDA graph when graphs are active for these tensors (``cuda_graphs.enabled``, CUDA, no grad) and
    ``net`` is a Module (its tensors are what a replay reads); else called as is. ``None`` inputs stay out of the
    graph and reach ``loop`` as None. At bench sizes the loop is compute-bound and a graph saves only the host's
    launch work; at small batches (tokens, previews) the launches are the cost."""
    names = tuple(k for k, v in inputs.items() if v is not None)
    tensors = tuple(inputs[k] for k in names)
    if not (isinstance(net, nn.Module) and cuda_graphs.active(*tensors)):
        return loop(**inputs)
    return cache.run(lambda *a: loop(**dict(zip(names, a))), tensors, (*key, names), net)


def _host(fn, t: float) -> float:
    return float(fn(torch.tensor(t, dtype=torch.float64)))


def _host_derivative(fn, t: float) -> float:
    """d fn / dt at t by autograd on a float64 scalar (0 for constant schedules)."""
    with torch.enable_grad():
        tt = torch.tensor(t, dtype=torch.float64, requires_grad=True)
        out = fn(tt)
        if not out.requires_grad:
            return 0.0
        (g,) = torch.autograd.grad(out, tt)
    return float(g)


@dataclass(frozen=True)
class _Node:
    """Host-side numbers of one grid time t (float64)."""

    t: float            # the grid time (float64)
    t_net: float        # the network's native time, computed from t rounded to the time dtype (as unigen.py:204-205)
    guide: bool         # CFG interval test on t_net
    # conversion coefficients at the (rounded) time the network saw
    a: float
    g: float
    at: float
    gt: float
    den: float
    # path coefficients at the exact grid time, for the update x_{i+1} = γ(t')·x̂ + α(t')·ẑ
    a_path: float
    g_path: float
    # path derivatives α'(t), γ'(t) at the rounded time (Euler / Heun velocity)
    da: float
    dg: float


def _time_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


class _GridSampler:
    """Grid, CFG and the float64 network evaluation shared by UCGM-S, Euler and Heun."""

    def __init__(self, steps: int, time_dist_ctrl=(1.17, 0.8, 1.1), rfba_gap_steps=(0.001, 0.001),
                 cfg_scale: float = 1.0, cfg_interval=(0.0, 1.0), return_x: str = "last_xhat",
                 transport: str | Transport = "linear", cfg_channels: int | None = None):
        if return_x not in RETURN_MODES:
            raise ValueError(f"return_x must be one of {RETURN_MODES}, got {return_x!r}")
        self.steps = int(steps)
        self.time_dist_ctrl = tuple(float(v) for v in time_dist_ctrl)
        self.rfba_gap_steps = tuple(float(v) for v in rfba_gap_steps)
        self.cfg_scale = float(cfg_scale)
        self.cfg_interval = tuple(float(v) for v in cfg_interval)
        self.cfg_channels = cfg_channels
        self.return_x = return_x
        self.transport = build_transport(transport)
        self.grid = time_grid(self.num_intervals, self.time_dist_ctrl, self.rfba_gap_steps)
        self._graphs = cuda_graphs.GraphCache()  # the sampling loop per (net, shape, dtype), see replay_or_call

    @property
    def num_intervals(self) -> int:
        return self.steps

    @property
    def num_iter(self) -> int:
        """Solver iterations (grid intervals); the name the token-AR samplers use for their loop length."""
        return self.num_intervals

    def _nodes(self, dtype: torch.dtype, cfg: CFGDenoiser, derivatives: bool = False) -> list[_Node]:
        tr, tdt = self.transport, _time_dtype(dtype)
        nodes = []
        for t in self.grid.tolist():
            t_r = float(torch.tensor(t, dtype=torch.float64).to(tdt))  # the time as the network dtype holds it
            t_net = float(tr.native_time(torch.tensor(t_r, dtype=tdt)))
            nodes.append(_Node(
                t=t, t_net=t_net, guide=cfg.in_interval(t_net),
                a=_host(tr.alpha_in, t_r), g=_host(tr.gamma_in, t_r), at=_host(tr.alpha_to, t_r),
                gt=_host(tr.gamma_to, t_r), den=_host(tr.den, t_r),
                a_path=_host(tr.alpha_in, t), g_path=_host(tr.gamma_in, t),
                da=_host_derivative(tr.alpha_in, t_r) if derivatives else math.nan,
                dg=_host_derivative(tr.gamma_in, t_r) if derivatives else math.nan))
        return nodes

    def _evaluate(self, cfg: CFGDenoiser, x: torch.Tensor, node: _Node, y, dtype: torch.dtype):
        """(x̂, ẑ) in float64 at state x (float64): F = sign·net(x in ``dtype``, native t (B,), y), then the
        conversion of transports.Transport.estimates with host-side coefficients (unigen.py:202-208)."""
        t_in = torch.full((x.shape[0],), node.t_net, dtype=_time_dtype(dtype), device=x.device)
        F = cfg(x.to(dtype), t_in, y, node.guide).to(torch.float64)
        if self.transport.output_sign < 0:
            F = -F
        x_hat = (node.a * F - node.at * x) / node.den
        z_hat = (node.gt * x - node.g * F) / node.den
        return x_hat, z_hat

    def _cfg(self, net) -> CFGDenoiser:
        return CFGDenoiser(net, self.cfg_scale, self.cfg_interval, channels=self.cfg_channels)

    def _finish(self, noise, x_final, x_hat_last, stack):
        if self.return_x == "final_x":
            # x at t = 0 is γ(0)·x (+ α(0)·z): back to data units. γ(0) = 1 for all but EDM, whose inputs are
            # c_in-scaled (γ(0) = 1/√(σ_min² + 0.25) ≈ 2).
            g0 = _host(self.transport.gamma_in, 0.0)
            return (x_final if g0 == 1.0 else x_final / g0).to(noise.dtype)
        if self.return_x == "stack":
            return torch.stack([noise] + [s.to(noise.dtype) for s in stack])
        return x_hat_last.to(noise.dtype)


# ------------------------------------------------------------------------------------------------------
# UCGM-S
# ------------------------------------------------------------------------------------------------------
class UCGMSampler(_GridSampler):
    """UCGM-S, the unified sampler (unigen.py:310-451; ucgm.md §2).

    Args (reference names of ``sampling_loop`` / the YAML ``sample:`` block in brackets):
        steps [sampling_steps]: number of network evaluations budgeted; with ``order=2`` the grid has
            ceil(steps / 2) intervals (L380).
        stochast_ratio ρ [stochast_ratio]: re-noise fraction, x' = γ(t')x̂ + α(t')(√(1−ρ)ẑ + √ρ ε) (L418-430);
            0 = DDIM (Euler for Linear), 1 = consistency-style multistep. ``"SDE"`` sets
            ρ = clamp((√|t'−t|·√(2α(t))/α(t'))², 0, 1) *on the first step and reuses that value afterwards*:
            the reference overwrites its ``stochast_ratio`` variable with the first step's tensor (L418-425),
            kept here for parity (likely unintended upstream).
        extrapol_ratio κ [extrapol_ratio]: from the 3rd step on, x̂ += κ(x̂ − x̂_prev), ẑ += κ(ẑ − ẑ_prev) with
            the *raw* (un-extrapolated) previous predictions (L409-416).
        order [sampling_order]: 1, or 2 = a Heun-like correction in ε-space (second evaluation at t', ẑ
            averaged, L432-447). As in the reference the correction is skipped on the last interval only when
            end_gap > 0 (with end_gap == 0 the reference's ``num_steps`` is one larger, so every interval,
            including the one into t = 0, is corrected). Needs γ(t_0) ≠ 0, i.e. start_gap > 0.
        time_dist_ctrl [time_dist_ctrl]: Kumaraswamy (a, b, c) of the grid; (1.17, 0.8, 1.1) is UCGM's advice.
        rfba_gap_steps [rfba_gap_steps]: (start_gap, end_gap): see :func:`time_grid`.
        cfg_scale, cfg_interval [sample.cfg_scale / cfg_interval]: see :class:`CFGDenoiser`; the interval is
            in the network's native time. ``cfg_channels``: guided channels (None = all).
        return_x: ``"last_xhat"`` (the reference's result: eval.py:227 takes ``sampling_loop(...)[-1]``, the
            raw x̂ of the last evaluation, before extrapolation; the final step to t = 0 is discarded),
            ``"final_x"`` (the state after the last step, at t = 0, divided by γ(0) so it is in data units:
            γ(0) = 1 except for EDM, ≈ 2), or ``"stack"`` (the reference's full
            return: [noise, x̂_0, ..., x̂_{n−1}]).
        transport [transport.type]: name or :class:`Transport`.

    ``__call__(net, noise, y, generator=None, noise_fn=None)``: ``net(x, t_native (B,), y) -> F``; ``noise``
    the initial z (t = 1), whose dtype the network is called in; ``generator`` drives every fresh draw;
    ``noise_fn(shape) -> Tensor`` (optional) replaces those draws (used to replay recorded noise).
    """

    def __init__(self, steps: int, stochast_ratio: float | str = 0.0, extrapol_ratio: float = 0.0, order: int = 1,
                 time_dist_ctrl=(1.17, 0.8, 1.1), rfba_gap_steps=(0.001, 0.001), cfg_scale: float = 1.0,
                 cfg_interval=(0.0, 1.0), return_x: str = "last_xhat", transport: str | Transport = "linear",
                 cfg_channels: int | None = None):
        if order not in (1, 2):
            raise ValueError(f"order (sampling_order) must be 1 or 2, got {order}")
        self.order = int(order)
        if isinstance(stochast_ratio, str):
            if stochast_ratio.upper() != "SDE":
                raise ValueError(f"stochast_ratio must be a float in [0, 1] or 'SDE', got {stochast_ratio!r}")
            self.stochast_ratio: float | str = "SDE"
        else:
            if not 0.0 <= float(stochast_ratio) <= 1.0:
                raise ValueError(f"stochast_ratio must be in [0, 1], got {stochast_ratio}")
            self.stochast_ratio = float(stochast_ratio)
        self.extrapol_ratio = float(extrapol_ratio)
        super().__init__(steps, time_dist_ctrl, rfba_gap_steps, cfg_scale, cfg_interval, return_x, transport,
                         cfg_channels)
        if self.order == 2 and _host(self.transport.gamma_in, float(self.grid[0])) == 0.0:
            raise ValueError("order 2 divides by γ(t_0) (unigen.py:443-446), which is 0 at t_0 = 1: "
                             "set rfba_gap_steps[0] > 0")
        # interval i gets the ε-space correction iff i < (num_steps − 1) of unigen.py:380-384, 433
        n = self.num_intervals
        n_lin = n + 1 if self.rfba_gap_steps[1] == 0.0 else n
        self._corrected = [self.order == 2 and i < n_lin - 1 for i in range(n)]
        self._rho = self._stochast_ratios()

    @property
    def num_intervals(self) -> int:
        return (self.steps + 1) // 2 if self.order == 2 else self.steps

    @property
    def nfe(self) -> int:
        """Network evaluations per call (a guided evaluation counts once, though it runs 2B rows)."""
        return self.num_intervals + sum(self._corrected)

    def _stochast_ratios(self) -> list[float]:
        """ρ per interval (host floats)."""
        n = self.num_intervals
        if self.stochast_ratio != "SDE":
            return [float(self.stochast_ratio)] * n
        t0, t1 = self.grid[0], self.grid[1]
        a = self.transport.alpha_in
        r = torch.sqrt((t1 - t0).abs()) * torch.sqrt(2 * a(t0)) / a(t1)  # inf when α(t_1) = 0: clamps to 1
        rho = float(torch.clamp(r**2, 0.0, 1.0))
        return [rho] * n  # the reference's overwrite: the first step's value for every step

    @torch.no_grad()
    def __call__(self, net, noise: torch.Tensor, y: torch.Tensor | None, generator: torch.Generator | None = None,
                 noise_fn: Callable[[torch.Size], torch.Tensor] | None = None) -> torch.Tensor:
        dtype = noise.dtype
        if noise_fn is None:
            def noise_fn(shape):
                return torch.randn(shape, generator=generator, device=noise.device, dtype=dtype)
        # ρ > 0 draws at every step, as the reference, so recorded draws line up one to one (even where α(t') = 0
        # or the order-2 correction overwrites x'); all drawn here, in step order
        draws = [noise_fn(noise.shape) for rho in self._rho if rho > 0]
        cfg = self._cfg(net)
        loop = functools.partial(self._loop, cfg, self._nodes(dtype, cfg))
        return replay_or_call(self._graphs, loop, net,
                              dict(noise=noise, y=y, eps=torch.stack(draws) if draws else None), ("ucgm",))

    def _loop(self, cfg: CFGDenoiser, nodes: list[_Node], noise: torch.Tensor, y: torch.Tensor | None = None,
              eps: torch.Tensor | None = None) -> torch.Tensor:
        """The solver from ``noise`` at t = 1; ``eps`` (one draw per interval with ρ > 0) re-noises in order."""
        dtype, kappa = noise.dtype, self.extrapol_ratio
        x = noise.to(torch.float64)
        stack, prev = [], None
        x_hat_raw = None
        k = 0  # the next unused draw
        for i in range(self.num_intervals):
            cur, nxt = nodes[i], nodes[i + 1]
            x_hat, z_hat = self._evaluate(cfg, x, cur, y, dtype)
            x_hat_raw = x_hat
            if self.return_x == "stack":
                stack.append(x_hat)
            # extrapolation from the 3rd step on, against the previous *raw* predictions (L409-416)
            if kappa > 0:
                raw = (x_hat, z_hat)
                if i > 1:
                    x_hat = x_hat + kappa * (x_hat - prev[0])
                    z_hat = z_hat + kappa * (z_hat - prev[1])
                prev = raw
            # stochastic re-noise (L418-430)
            rho = self._rho[i]
            if rho > 0:
                e = eps[k].to(torch.float64)
                k += 1
                x_next = nxt.g_path * x_hat + nxt.a_path * (z_hat * (1 - rho) ** 0.5 + e * rho**0.5)
            else:
                x_next = nxt.g_path * x_hat + nxt.a_path * z_hat
            # second-order correction in ε-space (L432-447): x' = x·γ(t')/γ(t) + (α(t') − γ(t')α(t)/γ(t))·ẑ̄
            if self._corrected[i]:
                _, z_pri = self._evaluate(cfg, x_next, nxt, y, dtype)
                ratio = nxt.g_path / cur.g_path
                x_next = x * ratio + (nxt.a_path - nxt.g_path * cur.a_path / cur.g_path) * (0.5 * z_hat + 0.5 * z_pri)
            x = x_next
        return self._finish(noise, x, x_hat_raw, stack)

    def __repr__(self) -> str:
        return (f"UCGMSampler(steps={self.steps}, stochast_ratio={self.stochast_ratio}, "
                f"extrapol_ratio={self.extrapol_ratio}, order={self.order}, time_dist_ctrl={self.time_dist_ctrl}, "
                f"rfba_gap_steps={self.rfba_gap_steps}, cfg_scale={self.cfg_scale}, cfg_interval={self.cfg_interval}, "
                f"return_x={self.return_x!r}, transport={self.transport!r})")


# ------------------------------------------------------------------------------------------------------
# Plain ODE solvers on the transport's velocity
# ------------------------------------------------------------------------------------------------------
class EulerSampler(_GridSampler):
    """Euler on the probability-flow velocity v = dx_t/dt = α'(t)·ẑ + γ'(t)·x̂ over :func:`time_grid`.

    For Linear v = ẑ − x̂ = F (the flow-matching velocity); for any transport this is the ODE that UCGM-S with
    ρ = 0, κ = 0 discretises differently (DDIM-style), so one checkpoint can be compared across solvers.
    Same constructor knobs and call signature as :class:`UCGMSampler` (``return_x`` defaults to the final x;
    ``generator``/``noise_fn`` are accepted and unused: the solver is deterministic).
    """

    def __init__(self, steps: int, time_dist_ctrl=(1.17, 0.8, 1.1), rfba_gap_steps=(0.001, 0.001),
                 cfg_scale: float = 1.0, cfg_interval=(0.0, 1.0), return_x: str = "final_x",
                 transport: str | Transport = "linear", cfg_channels: int | None = None):
        super().__init__(steps, time_dist_ctrl, rfba_gap_steps, cfg_scale, cfg_interval, return_x, transport,
                         cfg_channels)

    heun = False

    @property
    def nfe(self) -> int:
        """Network evaluations per call (Heun: no correction on the last interval)."""
        n = self.num_intervals
        return 2 * n - 1 if self.heun else n

    def _velocity(self, cfg, x, node, y, dtype):
        x_hat, z_hat = self._evaluate(cfg, x, node, y, dtype)
        return node.da * z_hat + node.dg * x_hat, x_hat

    @torch.no_grad()
    def __call__(self, net, noise: torch.Tensor, y: torch.Tensor | None, generator: torch.Generator | None = None,
                 noise_fn=None) -> torch.Tensor:
        cfg = self._cfg(net)
        loop = functools.partial(self._loop, cfg, self._nodes(noise.dtype, cfg, derivatives=True))
        return replay_or_call(self._graphs, loop, net, dict(noise=noise, y=y), ("euler",))

    def _loop(self, cfg: CFGDenoiser, nodes: list[_Node], noise: torch.Tensor,
              y: torch.Tensor | None = None) -> torch.Tensor:
        dtype = noise.dtype
        x = noise.to(torch.float64)
        stack, x_hat = [], None
        n = self.num_intervals
        for i in range(n):
            cur, nxt = nodes[i], nodes[i + 1]
            v, x_hat = self._velocity(cfg, x, cur, y, dtype)
            if self.return_x == "stack":
                stack.append(x_hat)
            h = nxt.t - cur.t
            x_next = x + h * v
            # Heun: trapezoidal correction, skipped on the last interval into t = 0 (Karras et al. 2022, Alg. 1)
            if self.heun and i < n - 1:
                v2, _ = self._velocity(cfg, x_next, nxt, y, dtype)
                x_next = x + h * (0.5 * v + 0.5 * v2)
            x = x_next
        return self._finish(noise, x, x_hat, stack)


class HeunSampler(EulerSampler):
    """Heun (2nd order, trapezoidal) on the same velocity and grid function.

    ``steps`` is the evaluation budget as for UCGM-S with ``order=2``: the grid has ceil(steps / 2) intervals
    and the solver makes 2·ceil(steps / 2) − 1 network evaluations (no correction on the last interval).
    """

    heun = True

    @property
    def num_intervals(self) -> int:
        return (self.steps + 1) // 2
