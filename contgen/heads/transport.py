"""Per-token transport heads: flow matching and UCGM (Sun et al. 2025) on one continuous token.

The head is MAR's AdaLN MLP denoiser (``SimpleMLPAdaLN``, Li et al. 2024 Sec. 3.3; :mod:`contgen.nn.adaln`): x_t
drives the residual stream and c = time_embed(t) + cond_embed(z) the adaLN, with z the backbone's output for this
token. It outputs one F of the token's width instead of MAR's (ε, v) pair, and is trained and sampled by the
transport family instead of a DDPM:

* training: :class:`~contgen.transport.ucgm.UCGMObjective` on the (N, D) rows (the objective is shape-agnostic).
  The MLP *is* the objective's ``net(x_t, t, y)``: its "labels" y are the per-row condition vectors z. Label
  dropping is off (``lab_drop_ratio`` 0): the backbone already replaces the class by the null class for CFG, so
  the unconditional z reaches the head as ordinary rows. ``batch_mul`` repeats the rows with fresh t and noise
  (MAR's ``diffusion_batch_mul``, mar.py:232-238).
* sampling: a few steps of a solver of :mod:`contgen.transport.solvers` (UCGM-S, Euler or Heun) on the same
  transport, instead of MAR's 100 ancestral DDPM steps.

``flow`` (conf/loss/flow.yaml) is λ = 0 with per-sample MSE and no time weight on Linear — plain flow matching,
target z − x. ``ucgm`` (conf/loss/ucgm.yaml) exposes the UCGM-T knobs that make sense per token: λ
(``consistc_ratio``; 1 = the few-step consistency mode), ``scaled_cbl_eps``, ``time_dist_ctrl``, the time weight,
the loss shape, the finite-difference ε and clip. **Not exposed: the enhanced target** (``enhanced_ratio``, guidance
baked into training). Done properly it needs, for every masked row, the *unconditional* condition vector — a second
backbone pass with the class dropped, which the head contract (``loss(target, z)``) does not give the head — plus a
teacher copy of the head; so it stays off rather than being approximated. Guidance is applied at sampling time.

Both are the same class, so a ``loss=flow`` checkpoint fine-tunes into ``loss=ucgm`` (λ = 1 from a flow model, as
the reference's few-step recipe starts from its multi-step model, ucgm.md §1.7), e.g. with
``resume_mode=new_stage``.

:class:`TokenTransportHead` holds what these heads share with the per-token Shortcut head (``loss=shortcut``,
:mod:`contgen.heads.shortcut`): the MLP, row tiling and the sampling preamble (CFG rows, temperature).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from contgen.heads.diffusion import DenoiserMLP
from contgen.transport.solvers import EulerSampler, HeunSampler, UCGMSampler
from contgen.transport.ucgm import UCGMObjective

SOLVERS = {"ucgm": UCGMSampler, "euler": EulerSampler, "heun": HeunSampler}
# conf/loss/flow.yaml's solver: UCGM-S at ρ = 0, κ = 0 on a uniform 16-step grid (on Linear: Euler on F)
DEFAULT_SOLVER = {"name": "ucgm", "steps": 16, "stochast_ratio": 0.0, "extrapol_ratio": 0.0, "order": 1,
                  "time_dist_ctrl": (1.0, 1.0, 1.0), "rfba_gap_steps": (0.0, 0.0), "return_x": "final_x"}


def transport_mlp(token_dim: int, cond_dim: int, width: int, depth: int, time_scale: float = 1000.0,
                  grad_checkpointing: bool = False, level_embed: bool = False) -> DenoiserMLP:
    """MAR's AdaLN MLP with one output F per token channel: ``net(x_t, t, z) -> F`` (same shape as x_t); ``t`` is the
    transport's native time in [0, 1], embedded as ``time_scale · t``. ``level_embed``: ``net(x_t, t, z, level)``
    with a second embedder for the integer step level (the shortcut head)."""
    return DenoiserMLP(token_dim, cond_dim, width, depth, grad_checkpointing, out_dim=token_dim, time_scale=time_scale,
                       level_embed=level_embed)


class _GuidedNet:
    """The solver's ``net(x, t, y, **cond)`` during sampling: y is the condition rows z.

    With ``cfg`` a float, z = [z_cond; z_uncond] (2N rows) and x has N rows: one MLP pass on [x; x] and
    F = F_u + cfg·(F_c − F_u), at every solver evaluation — MAR's guidance on ε (diffloss.py:240-248), on F here.
    (Guidance on F is guidance on x̂ and ẑ alike: both are affine in F with the same coefficients.) Further per-row
    inputs (the shortcut head's ``level``) are duplicated for the unconditional half.
    """

    def __init__(self, net: nn.Module, cfg: float):
        self.net, self.cfg = net, float(cfg)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, z: torch.Tensor, **cond: torch.Tensor) -> torch.Tensor:
        out = self.net(torch.cat([x, x]), torch.cat([t, t]), z, **{k: torch.cat([v, v]) for k, v in cond.items()})
        cond_out, uncond = out.chunk(2)
        return uncond + self.cfg * (cond_out - uncond)


class TokenTransportHead(nn.Module):
    """What the per-token transport heads share (:class:`TransportHead`, :class:`~contgen.heads.shortcut.ShortcutHead`):
    the AdaLN MLP ``net``, the contract's shape checks, ``batch_mul`` tiling of rows (and of the row weights), and
    the sampling preamble — the CFG row layout and the temperature-scaled Gaussian draws."""

    def __init__(self, token_dim: int, cond_dim: int, width: int, depth: int, batch_mul: int, time_scale: float,
                 grad_checkpointing: bool, level_embed: bool = False):
        super().__init__()
        if batch_mul < 1:
            raise ValueError(f"head.batch_mul: must be >= 1, got {batch_mul}")
        self.token_dim = token_dim
        self.batch_mul = int(batch_mul)
        self.net = transport_mlp(token_dim, cond_dim, width, depth, time_scale, grad_checkpointing, level_embed)
        self.last_metrics: dict[str, torch.Tensor] = {}

    def _tiled_rows(self, target: torch.Tensor, z: torch.Tensor, mask: torch.Tensor | None):
        """(x fp32, z, row weights or None), each tiled ``batch_mul`` times (MAR's diffusion_batch_mul)."""
        if target.ndim != 2 or target.shape[1] != self.token_dim or z.ndim != 2 or z.shape[0] != target.shape[0]:
            raise ValueError(f"head.loss: expected target (N, {self.token_dim}) and z (N, C), "
                             f"got {tuple(target.shape)} and {tuple(z.shape)}")
        weights = None if mask is None else mask.float().repeat(self.batch_mul)
        return target.float().repeat(self.batch_mul, 1), z.repeat(self.batch_mul, 1), weights

    def _sampling_inputs(self, z: torch.Tensor, temperature: float, cfg: float | None,
                         generator: torch.Generator | None):
        """(net to call as ``net(x, t, z, **cond)``, condition rows, tokens to make, ``draw(shape)``): with ``cfg``,
        z = [z_cond; z_uncond] and the net guides F; ``cfg == 1`` keeps only z_cond (exactly the conditional path);
        ``draw`` is τ·N(0, I) from ``generator``."""
        rows = z.shape[0]
        if cfg is not None and rows % 2:
            raise ValueError(f"head.sample: with cfg, z must be [z_cond; z_uncond] with an even row count, got {rows}")
        if cfg is not None and float(cfg) == 1.0:
            z, cfg = z[: rows // 2], None
        n = z.shape[0] if cfg is None else rows // 2
        net = self.net if cfg is None else _GuidedNet(self.net, cfg)
        tau = float(temperature)

        def draw(shape):
            return tau * torch.randn(shape, generator=generator, device=z.device, dtype=torch.float32)

        return net, z, n, draw


class TransportHead(TokenTransportHead):
    """Per-token flow-matching / UCGM head following the contgen head contract (``loss`` / ``sample``).

    Args (reference names of UCGM's ``transport:`` / ``sample:`` YAML blocks in brackets):
        token_dim, cond_dim: token width and the backbone's condition width (passed by the module).
        width, depth: the AdaLN MLP (MAR-B's head: 1024 × 6).
        batch_mul: rows repeated with fresh t and noise (MAR's ``diffusion_batch_mul``, 4 in MAR).
        time_scale: the MLP embeds ``time_scale · t`` (t in [0, 1]); 1000 puts its sinusoidal features where MAR's
            head has them for its 1000 integer steps.
        transport [type]: linear | relinear | trigflow | triglinear | edm (:mod:`contgen.transport.transports`).
        consistc_ratio [consistc_ratio]: λ; 0 = multi-step (flow matching on Linear), 1 = few-step consistency
            (central difference with ε = ``fd_eps``), (0, 1) in between.
        loss_type: ``mse`` (plain mean square per row) or ``rmse`` (the reference's sqrt(mean² + c²) − c).
        scaled_cbl_eps [scaled_cbl_eps]: c of the rmse loss (0 = per-row RMSE; 5 in the few-step configs).
        wt_cosine_loss [wt_cosine_loss]: + mean(1 − cos(F, F*)) over the token channels.
        weight_function [weight_funcion]: ``cosine`` (cos(1.57 t)) or None.
        time_dist_ctrl [time_dist_ctrl]: training t = clamp(Beta(a, b)·c, 0, 1).
        fd_eps, clip: λ = 1 finite-difference ε (0.005) and the tangent's elementwise clip (1).
        solver [sample:]: ``{"name": "ucgm" | "euler" | "heun", **kwargs}`` of that class of
            :mod:`contgen.transport.solvers` (steps, stochast_ratio, extrapol_ratio, order, time_dist_ctrl,
            rfba_gap_steps, return_x); default :data:`DEFAULT_SOLVER`. The transport is the head's; guidance is
            the sampler's ``cfg`` (see :meth:`sample`), so ``cfg_scale`` / ``cfg_interval`` are not accepted here.
    """

    def __init__(self, token_dim: int, cond_dim: int, width: int = 1024, depth: int = 6, batch_mul: int = 4,
                 time_scale: float = 1000.0, grad_checkpointing: bool = False, transport: str = "linear",
                 consistc_ratio: float = 0.0, loss_type: str = "mse", scaled_cbl_eps: float = 0.0,
                 wt_cosine_loss: bool = False, weight_function: str | None = None,
                 time_dist_ctrl=(1.0, 1.0, 1.0), fd_eps: float = 0.005, clip: float = 1.0,
                 solver: Mapping | None = None):
        super().__init__(token_dim, cond_dim, width, depth, batch_mul, time_scale, grad_checkpointing)
        try:
            self.objective = UCGMObjective(
                transport, consistc_ratio=consistc_ratio, enhanced_ratio=0.0, scaled_cbl_eps=scaled_cbl_eps,
                loss=loss_type, wt_cosine_loss=wt_cosine_loss, weight_function=weight_function,
                time_dist_ctrl=tuple(time_dist_ctrl), lab_drop_ratio=0.0, fd_eps=fd_eps, clip=clip,
                ema_decay_rate=0.0)
        except ValueError as e:
            raise ValueError(f"head: {e}") from None
        self.solver = self._build_solver(dict(solver if solver is not None else DEFAULT_SOLVER))

    def _build_solver(self, spec: dict):
        name = str(spec.pop("name", "ucgm")).lower()
        if name not in SOLVERS:
            raise ValueError(f"head.solver.name: one of {sorted(SOLVERS)}, got {name!r}")
        for key in ("cfg_scale", "cfg_interval", "cfg_channels", "transport"):
            if key in spec:
                raise ValueError(f"head.solver.{key}: not a solver setting of a head (guidance is sampler.cfg, "
                                 f"the transport is head.transport)")
        if "steps" not in spec:
            raise ValueError("head.solver.steps: required (network evaluations per token)")
        if name != "ucgm":
            # UCGM-S-only keys at the values where UCGM-S *is* the deterministic ODE solver are dropped, so
            # `loss.solver.name=euler` works on a config written for ucgm; any other value is an error below.
            for key, neutral in (("stochast_ratio", 0.0), ("extrapol_ratio", 0.0), ("order", 1)):
                if key in spec and spec[key] == neutral:
                    del spec[key]
        try:
            return SOLVERS[name](**spec, transport=self.objective.transport)
        except (TypeError, ValueError) as e:
            raise ValueError(f"head.solver ({name}): {e}") from None

    # -- training ---------------------------------------------------------------------------------------
    def loss(self, target: torch.Tensor, z: torch.Tensor, mask: torch.Tensor | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """Transport loss of rows ``target`` (N, D) given ``z`` (N, C); masked mean with row weights ``mask``.

        Rows are tiled ``batch_mul`` times, each copy with its own t and noise (drawn as the objective draws them:
        t, then z). Without ``mask`` this is exactly ``objective.loss(net, target, z)`` on the tiled rows; with it,
        the same per-row losses (time weight included) averaged with the weights. ``last_metrics``:
        ``loss_unweighted`` (before the time weight) and, for λ ≠ 0, ``clip_frac`` (share of clipped tangent
        entries). No host syncs.
        """
        x, z, w = self._tiled_rows(target, z, mask)
        obj = self.objective
        draws = obj.draw(x, None, None, generator)
        F, target_F, logs = obj.predict_and_target(self.net, x, z, draws)
        per = obj.per_sample_loss(F, target_F)
        w_t = obj.time_weight(draws["t"])
        weighted = per if w_t is None else per * w_t.to(per.dtype)
        if w is None:
            loss, unweighted = weighted.mean(), per.detach().mean()
        else:
            w = w / w.sum()
            loss, unweighted = (weighted * w).sum(), (per.detach() * w).sum()
        self.last_metrics = {"loss_unweighted": unweighted, **{k: v.detach() for k, v in logs.items()}}
        return loss

    # -- sampling ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, z: torch.Tensor, temperature: float = 1.0, cfg: float | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """One token per condition row by ``self.solver`` (``solver.nfe`` MLP passes, 2N rows each under CFG).

        ``temperature`` τ scales every Gaussian draw of the solver: the initial noise x_1 = τ·ε and, for UCGM-S with
        ``stochast_ratio`` ρ > 0, its re-noise draws. With a deterministic solver (ρ = 0, Euler, Heun) the samples are
        the flow of τ·ε, so τ < 1 concentrates them (the flow analogue of a Glow/MAR temperature; τ = 1 is the
        trained model). With ``cfg``, z = [z_cond; z_uncond] (2N rows), as the diffusion head: every solver
        evaluation runs the MLP on [x; x] and uses F_u + cfg·(F_c − F_u); N rows come back. ``cfg == 1`` is
        exactly the conditional path: only z_cond is evaluated (bit-identical to ``cfg=None`` on z_cond).
        """
        net, z, n, draw = self._sampling_inputs(z, temperature, cfg, generator)
        return self.solver(net, draw((n, self.token_dim)), z, generator=generator, noise_fn=draw).float()

    def extra_repr(self) -> str:
        return f"token_dim={self.token_dim}, batch_mul={self.batch_mul}, {self.objective!r}, {self.solver!r}"


__all__ = ["SOLVERS", "TokenTransportHead", "TransportHead", "transport_mlp"]
