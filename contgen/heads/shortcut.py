"""Per-token Shortcut head (``loss=shortcut``): each continuous token sampled in 1, 2, 4, ... head steps.

Shortcut models (Frans, Hafner, Levine, Abbeel, ICLR 2025; ``shared/reference/shortcut.md``) applied to MAR/EAR's
per-token distribution: the head is MAR's AdaLN MLP (:class:`~contgen.heads.diffusion.DenoiserMLP`) with a second
timestep embedder for the integer step level ℓ = log2(1/d) (the reference DiT's two embedders, model.py:261-264),
conditioned on the backbone's z for the token. One MLP then samples a token in N ∈ {1, 2, 4, ..., M} Euler steps
at level log2 N instead of MAR's 100 ancestral DDPM steps (FAR, Hang et al. 2025, makes the same trade with a
shortcut head and reports ~2.3× faster inference than MAR).

* **Training**: :class:`~contgen.transport.shortcut.ShortcutObjective` on the head's (N, D) rows — the reference's
  targets (targets_shortcut.py): one row in ``bootstrap_every`` a self-consistency row (levels assigned
  deterministically over 0..L−1, t on the grid of multiples of d, target the mean of two chained half steps at level
  ℓ + 1, clipped to ±``clip_value``), the rest flow-matching rows at level L = log2 M, one plain mean over the merged
  rows. The MLP is the objective's ``net(x_t, t, y, level)`` with the condition z gathered by row id (the
  objective's "labels" are row ids, so z keeps its graph and the backbone learns through the head). The rows are
  tiled ``batch_mul`` times (MAR's diffusion_batch_mul) and randomly permuted with the step's generator before the
  objective's layout splits them (as the reference permutes its batch, train.py:208-210): the masked rows arrive
  image by image, so without it every bootstrap level would take the tokens of one or two images.
* **Half steps from the online head** (``bootstrap_ema`` false, no grad): shortcut.md §6b measured online targets
  converging faster than EMA-0.999 targets on a 2-D toy, and the head has no EMA copy of its own (the module's EMA
  of the whole net is not reachable through the head contract), so ``bootstrap_ema: true`` is refused.
* **No label handling in the head**: ``class_dropout_prob`` 0, ``bootstrap_cfg`` off, labels never touched. The
  backbone drops the class (``label_drop_prob``) before the head, so unconditional z rows reach the head as ordinary
  rows, flow and bootstrap rows alike. Distilling CFG into the targets (``bootstrap_cfg``) would need the
  *unconditional* z of every bootstrap row — a second backbone pass the contract (``loss(target, z)``) does not give
  the head — so guidance is applied at sampling time instead.
* **Sampling**: :func:`~contgen.transport.shortcut.shortcut_euler` (the same loop as the image sampler) with
  ``steps`` N: from τ·ε at t = 1, x ← x − F(x, t, z, log2 N)/N. With ``cfg``, z = [z_cond; z_uncond] and every step
  uses F_u + cfg·(F_c − F_u) (one MLP pass on 2N rows), as the flow/UCGM heads. Unlike the image sampler, there is
  **no warning for cfg at N < M**: there, the shortcut levels never saw the null class and already carry distilled
  guidance; here every level was trained on the backbone's unconditional rows and nothing is distilled, so F_u is in
  distribution at every level and guidance is not doubled. (It guides the step's average velocity, which equals
  guiding the flow only at N = M; for N < M it is the usual few-step approximation.) ``temperature`` τ scales the
  initial noise; the sampler is then deterministic, so τ < 1 concentrates the tokens (τ = 1: the trained model).

Time convention: the objective's transport :class:`~contgen.transport.transports.ShortcutLinear` feeds the MLP the
reference's s = 1 − t (0 = noise), embedded as ``time_scale``·s (1000, where MAR's head has its 1000 steps; the
reference DiT feeds s unscaled, shortcut.md §1) and the level as the integer ℓ, unscaled (as the reference).
"""

from __future__ import annotations

import torch

from contgen.heads.transport import TokenTransportHead
from contgen.transport.shortcut import LEVEL_ASSIGNMENTS, ShortcutObjective, shortcut_euler


class _RowCondNet:
    """The objective's ``net(x, t, rows, level)``: the head's MLP conditioned on ``z[rows]``. Row ids are integer
    labels (never dropped: ``class_dropout_prob`` 0), so they travel with the rows through whatever the objective does
    to them, and the gather keeps z's graph wherever grad is on."""

    def __init__(self, net: torch.nn.Module, z: torch.Tensor):
        self.net, self.z = net, z

    def __call__(self, x: torch.Tensor, t: torch.Tensor, rows: torch.Tensor, **cond: torch.Tensor) -> torch.Tensor:
        return self.net(x, t, self.z[rows], **cond)


class ShortcutHead(TokenTransportHead):
    """Per-token Shortcut head following the contgen head contract (``loss`` / ``sample``).

    Args (the reference's ``model`` config names, train.py:39-66, where they exist):
        token_dim, cond_dim: token width and the backbone's condition width (passed by the module).
        width, depth: the AdaLN MLP (MAR-B's head: 1024 × 6).
        batch_mul: rows repeated (each copy its own draws) before the objective (MAR's ``diffusion_batch_mul``).
        time_scale: the MLP embeds ``time_scale · s`` (s in [0, 1]).
        denoise_timesteps: M, a power of two; levels 0..L, L = log2 M the flow level. Few-step sampling only uses
            levels 0..log2 ``steps``; a smaller M puts more self-consistency rows on each of them.
        bootstrap_every: one row in ``bootstrap_every`` is a self-consistency row (the paper's 4; the reference code's
            8 gave 1.2-1.4× the 1-step sliced distance on the 2-D mixture of tests/heads, 600 steps, 2 seeds).
        bootstrap_ema: must be false (see the module docstring).
        bootstrap_dt_bias: the reference's biased level layout (more rows at levels 1 and 0).
        clip_value: ± clip of the half-step state and of the bootstrap target (4 for unit-variance tokens); null = off.
        level_assignment: ``deterministic`` (the reference's layout over the step's rows; needs at least L
            self-consistency rows, i.e. N·batch_mul // bootstrap_every ≥ L) or ``random_uniform``.
        steps: N, Euler steps per token when sampling, a power of two ≤ M.
    """

    def __init__(self, token_dim: int, cond_dim: int, width: int = 1024, depth: int = 6, batch_mul: int = 4,
                 time_scale: float = 1000.0, grad_checkpointing: bool = False, denoise_timesteps: int = 128,
                 bootstrap_every: int = 4, bootstrap_ema: bool = False, bootstrap_dt_bias: bool = False,
                 clip_value: float | None = 4.0, level_assignment: str = "deterministic", steps: int = 4):
        if bootstrap_ema:
            raise ValueError("head.bootstrap_ema=true: the per-token shortcut head has no EMA copy of its own (the "
                             "module's EMA is not reachable through the head contract); its half steps use the online "
                             "head without gradient (bootstrap_ema=false, which converged faster, shortcut.md §6b)")
        super().__init__(token_dim, cond_dim, width, depth, batch_mul, time_scale, grad_checkpointing, level_embed=True)
        if level_assignment not in LEVEL_ASSIGNMENTS:  # named here: the objective's message says objective.*
            raise ValueError(f"head.level_assignment must be one of {LEVEL_ASSIGNMENTS}, got {level_assignment!r}")
        try:
            self.objective = ShortcutObjective(
                denoise_timesteps, bootstrap_every, bootstrap_ema=False, bootstrap_cfg=False,
                bootstrap_dt_bias=bootstrap_dt_bias, cfg_scale=1.0, class_dropout_prob=0.0, clip_value=clip_value,
                level_assignment=level_assignment)
        except ValueError as e:
            raise ValueError(str(e).replace("objective.", "head.")) from None
        steps, M = int(steps), self.objective.denoise_timesteps
        if steps < 1 or steps & (steps - 1) or steps > M:
            raise ValueError(f"head.steps must be a power of two in [1, head.denoise_timesteps = {M}] (the level is "
                             f"log2 steps), got {steps}")
        self.steps = steps

    @property
    def nfe(self) -> int:
        """MLP evaluations per token (2N rows each under CFG)."""
        return self.steps

    # -- training ---------------------------------------------------------------------------------------
    def _check_rows(self, n: int) -> None:
        """Refuse, before any compute, a row count whose deterministic layout cannot hold every level (the objective
        would otherwise raise naming the data batch, which is not what sets the head's rows)."""
        obj = self.objective
        rows = n // obj.bootstrap_every
        if obj.level_assignment == "deterministic" and rows < obj.num_levels:
            raise ValueError(
                f"head: {n} token rows (masked tokens × head.batch_mul) // head.bootstrap_every {obj.bootstrap_every} "
                f"= {rows} self-consistency rows, fewer than the {obj.num_levels} levels of head.denoise_timesteps "
                f"{obj.denoise_timesteps}: raise data.batch_size or head.batch_mul, lower head.bootstrap_every or "
                "head.denoise_timesteps, or set head.level_assignment=random_uniform")

    def loss(self, target: torch.Tensor, z: torch.Tensor, mask: torch.Tensor | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """Shortcut loss of rows ``target`` (N, D) given ``z`` (N, C); with ``mask``, the weighted mean of the per-row
        losses. Draws: the row permutation, then the objective's (levels, times, noise). ``last_metrics``: the
        objective's logs (loss_flow, loss_bootstrap, loss per level, target RMS), unweighted. No host syncs beyond
        the objective's.

        The objective's "labels" are the permuted row ids, and its net gathers ``z`` by them (:class:`_RowCondNet`):
        the targets are built without grad, but the trained forward gathers z with its graph, so the backbone learns
        through every row (bootstrap rows included, as the reference's label embedding does). Passing z itself as
        the labels would cut the backbone off: the objective merges its labels inside its no-grad ``targets``."""
        x, z, w = self._tiled_rows(target, z, mask)
        self._check_rows(x.shape[0])
        perm = torch.randperm(x.shape[0], generator=generator, device=x.device)
        net, obj = _RowCondNet(self.net, z), self.objective
        loss, logs = obj.loss(net, x[perm], perm, generator, teacher=obj.build_teacher(net),
                              weights=None if w is None else w[perm])
        self.last_metrics = {k: v.detach() for k, v in logs.items()}
        return loss

    # -- sampling ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, z: torch.Tensor, temperature: float = 1.0, cfg: float | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """One token per condition row in ``steps`` Euler steps at level log2 ``steps``; with ``cfg``, z = [z_cond;
        z_uncond] (2N rows) and F is guided at every step (``cfg == 1``: exactly the conditional path). ``temperature``
        scales the initial noise (the only random draw)."""
        net, z, n, draw = self._sampling_inputs(z, temperature, cfg, generator)
        return shortcut_euler(net, draw((n, self.token_dim)), z, self.steps, self.objective.transport).float()

    def extra_repr(self) -> str:
        return f"token_dim={self.token_dim}, batch_mul={self.batch_mul}, steps={self.steps}, {self.objective!r}"


__all__ = ["ShortcutHead"]
