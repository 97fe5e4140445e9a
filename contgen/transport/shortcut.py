"""Shortcut models (Frans, Hafner, Levine, Abbeel, ICLR 2025): one network for 1 to 2^L sampling steps.

Reference: kvfrans/shortcut-models @ 6010043 (JAX), ``targets_shortcut.py`` (the targets), ``train.py:236-250`` (the
loss), ``helper_eval.py:150-166`` (the sampler); notes in ``shared/reference/shortcut.md`` §1-2. Parity with that
code is proven on fixtures it made (``tests/fixtures/make_shortcut_fixtures.py``, ``tests/transport/test_shortcut.py``).

The network s_θ(x, t, y, level) is conditioned on the step size d = 2^-level as well as the time (paper Eq. 5). A
batch of B rows is split (targets_shortcut.py:10, 100-106):

* the first B // ``bootstrap_every`` rows are **self-consistency** rows: level ℓ in 0..L-1 (L = log2 M, M =
  ``denoise_timesteps``), time on the grid of multiples of d with t + d ≤ 1, and the target the mean of two chained
  half steps of the EMA network at level ℓ + 1 (paper Eq. 6), each clipped to ±``clip_value``;
* the other rows are **flow-matching** rows at level L (the paper's "d = 0" is d = 1/M in the code), t on the 1/M
  grid, target v = x − (1 − 1e-5)·z; only these rows have their labels dropped (p = ``class_dropout_prob``).

The loss is one plain mean of the per-row MSE over the merged batch (train.py:236-238), not separately normalised
parts. Levels are assigned deterministically (targets_shortcut.py:11-25): L-1, L-2, ..., 0 in equal blocks of
rows // L, the remainder at level 0; with ``bootstrap_cfg`` the level L-1 rows get CFG-guided targets (w =
``cfg_scale``) from the null class, which distils guidance into every level ≤ L-1 (L48-69).

Time: the reference's s = 0 is noise; contgen's t = 1 is noise. The conversion is the transport
:class:`~contgen.transport.transports.ShortcutLinear` (s = 1 − t, F = −v), exact for the dyadic times used here, so
every number equals the reference's.

Deliberate differences (none changes the distribution the reference trains on):

* flow rows are the batch's other rows, not ``images[:B - bsz]`` (which re-uses the bootstrap images and never
  trains on the last bsz, the reference's issue #10); pass the reference's rows to reproduce it exactly;
* bootstrap and flow draws are independent (the reference reuses ``time_key`` and ``noise_key`` for both, L29/L85,
  L37/L92); every draw comes from an explicit ``torch.Generator``;
* under DDP the levels are assigned over the **global** batch (rank r takes every W-th row of the global layout, so
  the global level mix is the reference's); a layout that cannot hold every level is refused before training
  (the reference silently trains only d = 1 then, its issue #11). ``level_assignment="random_uniform"`` draws
  each bootstrap row's level uniformly instead (an opt-in deviation; the level histogram is logged);
* the CFG rows are chosen by level (``level == L-1``), not by position.
"""

from __future__ import annotations

import functools
import math
import warnings

import torch

from contgen.transport.solvers import CFGDenoiser, replay_or_call
from contgen.transport.transports import ShortcutLinear, expand_time
from contgen.utils import cuda_graphs

LEVEL_ASSIGNMENTS = ("deterministic", "random_uniform")


def _power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _rms(v: torch.Tensor) -> torch.Tensor:
    return v.detach().float().square().mean().sqrt()


def bootstrap_levels(rows: int, num_levels: int, dt_bias: bool = False) -> list[int]:
    """The reference's ``dt_base`` for ``rows`` self-consistency rows (targets_shortcut.py:11-25): levels L-1 .. 0
    in blocks of rows // L, padded with level 0; with ``dt_bias``, L-1 .. 2 in blocks of (rows // 2) // L, then
    rows // 4 rows at level 1 and at level 0, padded with 0."""
    L = num_levels
    if dt_bias:
        levels = [L - 1 - i for i in range(L - 2) for _ in range((rows // 2) // L)] + [1] * (rows // 4) + [0] * (rows // 4)
    else:
        levels = [L - 1 - i for i in range(L) for _ in range(rows // L)]
    return levels + [0] * (rows - len(levels))


class ShortcutObjective:
    """The Shortcut training objective; keys as the reference's ``model`` config (train.py:39-66).

    Args:
        denoise_timesteps: M, a power of two; levels 0..L with L = log2 M (the flow level).
        bootstrap_every: one row in ``bootstrap_every`` is a self-consistency row (reference default 8; the paper's
            fraction 1/4 is 4).
        bootstrap_ema: half steps with the EMA weights (the reference default) or the online weights, no grad.
        bootstrap_cfg: distil CFG (w = ``cfg_scale``) into the level L-1 targets (the ImageNet recipe).
        bootstrap_dt_bias: the reference's biased level layout (more rows at levels 1 and 0).
        cfg_scale: the distilled guidance scale; 0 = an unconditional model: every label becomes the null class
            before the targets are built (train.py:214-215).
        class_dropout_prob: label dropout of the flow rows (the null class is ``num_classes``).
        clip_value: the ±clip of the half-step state and the bootstrap target (4, for unit-variance latents); null
            turns both off.
        level_assignment: ``deterministic`` (the reference) or ``random_uniform``.
    """

    def __init__(self, denoise_timesteps: int = 128, bootstrap_every: int = 8, bootstrap_ema: bool = True,
                 bootstrap_cfg: bool = False, bootstrap_dt_bias: bool = False, cfg_scale: float = 1.5,
                 class_dropout_prob: float = 0.1, clip_value: float | None = 4.0,
                 level_assignment: str = "deterministic"):
        if not _power_of_two(int(denoise_timesteps)) or denoise_timesteps < 2:
            raise ValueError(f"objective.denoise_timesteps must be a power of two >= 2, got {denoise_timesteps}")
        if int(bootstrap_every) < 1:
            raise ValueError(f"objective.bootstrap_every must be >= 1, got {bootstrap_every}")
        if level_assignment not in LEVEL_ASSIGNMENTS:
            raise ValueError(f"objective.level_assignment must be one of {LEVEL_ASSIGNMENTS}, got {level_assignment!r}")
        if bootstrap_dt_bias and level_assignment != "deterministic":
            raise ValueError("objective.bootstrap_dt_bias is a layout of the deterministic level assignment")
        if not 0.0 <= class_dropout_prob <= 1.0:
            raise ValueError(f"objective.class_dropout_prob must be in [0, 1], got {class_dropout_prob}")
        if cfg_scale < 0:
            raise ValueError(f"objective.cfg_scale must be >= 0 (0: unconditional), got {cfg_scale}")
        if clip_value is not None and clip_value <= 0:
            raise ValueError(f"objective.clip_value must be > 0 or null, got {clip_value}")
        self.transport = ShortcutLinear()
        self.denoise_timesteps = int(denoise_timesteps)
        self.num_levels = int(math.log2(self.denoise_timesteps))  # L; level L is the flow level
        self.bootstrap_every, self.bootstrap_ema = int(bootstrap_every), bool(bootstrap_ema)
        self.bootstrap_cfg, self.bootstrap_dt_bias = bool(bootstrap_cfg), bool(bootstrap_dt_bias)
        self.cfg_scale, self.class_dropout_prob = float(cfg_scale), float(class_dropout_prob)
        self.clip_value = None if clip_value is None else float(clip_value)
        self.level_assignment = level_assignment
        self.world_size, self.rank = 1, 0
        self._layouts: dict = {}
        self._level_tensors: dict = {}
        self._graphs = cuda_graphs.GraphCache()  # the half steps, see :meth:`_half_steps`

    # -- layout ------------------------------------------------------------------------------------------------
    def setup(self, batch_size: int, world_size: int = 1, rank: int = 0) -> None:
        """Bind the per-device batch and the process group before training; refuses a layout that cannot hold every
        level (the reference's issue #11) or that does not split over the devices."""
        self.world_size, self.rank = int(world_size), int(rank)
        self._layouts.clear()
        self._level_tensors.clear()
        self.layout(batch_size)

    def layout(self, batch: int) -> tuple[int, list[int] | None]:
        """(bootstrap rows of this device, their levels or None when drawn at random) for a per-device batch."""
        if batch not in self._layouts:
            self._layouts[batch] = self._layout(batch)
        return self._layouts[batch]

    def _layout(self, batch: int) -> tuple[int, list[int] | None]:
        global_rows = batch * self.world_size // self.bootstrap_every
        where = (f"data.batch_size {batch} x {self.world_size} device(s) // objective.bootstrap_every "
                 f"{self.bootstrap_every} = {global_rows} self-consistency rows")
        if global_rows % self.world_size:
            raise ValueError(f"{where} do not split evenly over {self.world_size} devices: change data.batch_size or "
                             "objective.bootstrap_every")
        rows = global_rows // self.world_size
        if self.level_assignment == "random_uniform":
            return rows, None
        if global_rows < self.num_levels:
            raise ValueError(f"{where}, fewer than the {self.num_levels} levels of objective.denoise_timesteps "
                             f"{self.denoise_timesteps}: the deterministic layout would put every row at d = 1 (the "
                             "reference's issue #11). Raise data.batch_size, lower objective.bootstrap_every, or set "
                             "objective.level_assignment=random_uniform")
        levels = bootstrap_levels(global_rows, self.num_levels, self.bootstrap_dt_bias)
        return rows, levels[self.rank::self.world_size]

    # -- teacher ----------------------------------------------------------------------------------------------
    def build_teacher(self, net: torch.nn.Module, ema: torch.nn.Module | None = None):
        """The network of the half steps: the module's EMA copy (``bootstrap_ema``, updated after each optimizer
        step as train_state.py:55-59) or the online one, evaluated without gradient."""
        from contgen.transport.teacher import Teacher

        if self.bootstrap_ema and ema is None:
            raise ValueError("objective.bootstrap_ema needs the module's EMA network")
        return Teacher(ema if self.bootstrap_ema else net, policy="online")

    # -- random draws -----------------------------------------------------------------------------------------
    def draw(self, x: torch.Tensor, generator: torch.Generator | None = None) -> dict:
        """The step's draws: bootstrap ``level`` (rows,), ``s_boot`` on the level's grid, ``z_boot``; flow ``s_flow``
        on the 1/M grid, ``z_flow`` and the label-drop mask ``drop``. Times are the reference's s (0 = noise)."""
        rows, levels = self.layout(x.shape[0])
        n_flow, dev = x.shape[0] - rows, x.device
        if levels is None:
            level = torch.randint(0, self.num_levels, (rows,), generator=generator, device=dev)
        else:  # copied to the device once per batch size: a per-step host-to-device copy would sync
            key = (x.shape[0], str(dev))
            if key not in self._level_tensors:
                self._level_tensors[key] = torch.tensor(levels, dtype=torch.long, device=dev)
            level = self._level_tensors[key]
        sections = torch.exp2(level.to(torch.float32))  # 2^level, exact
        # k uniform on {0, .., 2^level - 1} (randint with a per-row bound, L30): floor(u·2^level), u on a 2^-24 grid
        s_boot = torch.floor(torch.rand(rows, generator=generator, device=dev) * sections) / sections
        z_boot = torch.randn((rows, *x.shape[1:]), generator=generator, device=dev, dtype=x.dtype)
        drop = torch.rand(n_flow, generator=generator, device=dev) < self.class_dropout_prob
        M = self.denoise_timesteps
        s_flow = torch.randint(0, M, (n_flow,), generator=generator, device=dev).to(torch.float32) / M
        z_flow = torch.randn((n_flow, *x.shape[1:]), generator=generator, device=dev, dtype=x.dtype)
        return {"level": level, "s_boot": s_boot, "z_boot": z_boot, "drop": drop, "s_flow": s_flow, "z_flow": z_flow}

    # -- targets ----------------------------------------------------------------------------------------------
    def _half_step_velocity(self, teacher, x, t, y, level, cfg_rows: int, cfg_mask):
        """F of the half-step network at (x, t, y, level); the first ``cfg_rows`` rows (where ``cfg_mask``, if
        given) guided with the null class in the same pass (targets_shortcut.py:49-57)."""
        tr = self.transport
        if cfg_rows == 0:
            return tr.model_output(teacher, x, t, y, level=level)
        null = torch.full_like(y[:cfg_rows], teacher.num_classes)
        F = tr.model_output(teacher, torch.cat([x, x[:cfg_rows]]), torch.cat([t, t[:cfg_rows]]),
                            torch.cat([y, null]), level=torch.cat([level, level[:cfg_rows]]))
        F, uncond = F[:x.shape[0]], F[x.shape[0]:]
        guided = uncond + self.cfg_scale * (F[:cfg_rows] - uncond)
        if cfg_mask is not None:
            guided = torch.where(expand_time(cfg_mask, guided), guided, F[:cfg_rows])
        return torch.cat([guided, F[cfg_rows:]])

    def _clip(self, v: torch.Tensor) -> torch.Tensor:
        return v if self.clip_value is None else v.clamp(-self.clip_value, self.clip_value)

    def _half_steps(self, teacher, cfg_rows: int, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                    level: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(F1, F2) stacked: the two chained half steps of size d/2 at level ℓ + 1 (targets_shortcut.py:40-68). A
        pure function of its tensors and the teacher's weights: under ``module.cuda_graphs`` in training on one GPU
        (or DDP) the two small no-grad passes (B/8 rows plus the CFG rows) replay as one CUDA graph, since at that
        row count their launches, not their FLOPs, set the time (bench/README, Shortcut)."""
        d = torch.exp2(-level.to(torch.float32))  # the reference's dt = 1 / 2^dt_base
        half = expand_time(d / 2, x_t).to(x_t.dtype)
        F1 = self._half_step_velocity(teacher, x_t, t, y, level + 1, cfg_rows, mask)
        x_t2 = self._clip(x_t - half * F1)
        F2 = self._half_step_velocity(teacher, x_t2, t - d / 2, y, level + 1, cfg_rows, mask)
        return torch.stack([F1, F2])

    @torch.no_grad()
    def targets(self, teacher, x: torch.Tensor, y: torch.Tensor, draws: dict) -> dict:
        """The merged batch (bootstrap rows first): ``x_t``, contgen time ``t``, ``level``, labels ``y``, ``target``
        (F* = −v*), and ``rms`` of the bootstrap target and of its two half-step velocities (L109-111). Built under
        no_grad, labels included: a caller whose "labels" need a gradient passes row ids instead (the per-token head)."""
        tr, L = self.transport, self.num_levels
        level = draws["level"]
        rows = level.shape[0]
        if self.cfg_scale == 0:  # unconditional: every label is the null class (train.py:214-215)
            y = torch.full_like(y, teacher.num_classes)
        xb, yb = x[:rows], y[:rows]
        t = 1 - draws["s_boot"]
        x_t = tr.interpolate(xb, draws["z_boot"], t)
        if self.bootstrap_cfg and self.cfg_scale != 0:
            # deterministic layouts put the level L-1 rows first (rows // L of them, or (rows // 2) // L with the
            # bias, L15/L21); drawn levels are guided by mask over every row
            levels = self.layout(x.shape[0])[1]
            mask = None if levels is not None else level == L - 1
            cfg_rows = rows if levels is None else levels.count(L - 1)
        else:
            mask, cfg_rows = None, 0
        F1, F2 = replay_or_call(self._graphs, functools.partial(self._half_steps, teacher, cfg_rows),
                                getattr(teacher, "module", teacher),
                                dict(x_t=x_t, t=t, y=yb, level=level, mask=mask), ("half_steps", cfg_rows))
        target_b = self._clip((F1 + F2) / 2)

        xf, yf = x[rows:], y[rows:]
        t_flow = 1 - draws["s_flow"]
        if self.class_dropout_prob > 0:
            yf = torch.where(draws["drop"], torch.full_like(yf, teacher.num_classes), yf)
        return {
            "x_t": torch.cat([x_t, tr.interpolate(xf, draws["z_flow"], t_flow)]),
            "t": torch.cat([t, t_flow]),
            "level": torch.cat([level, level.new_full((xf.shape[0],), L)]),
            "y": torch.cat([yb, yf]),
            "target": torch.cat([target_b, tr.target(xf, draws["z_flow"], t_flow)]),
            "rows": rows,
            "rms": {"target_rms_bootstrap": _rms(target_b), "target_rms_b1": _rms(F1), "target_rms_b2": _rms(F2)},
        }

    # -- loss -------------------------------------------------------------------------------------------------
    def loss(self, net, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None, teacher=None,
             draws: dict | None = None, weights: torch.Tensor | None = None):
        """(mean over the merged batch of the per-row MSE, detached logs: loss_flow, loss_bootstrap, loss per level,
        target RMS, and the level histogram when levels are drawn). ``teacher`` is :meth:`build_teacher`'s.
        ``weights`` (rows,): a weighted mean instead (the per-token head's row mask); the logs stay unweighted."""
        if teacher is None:
            raise ValueError("the Shortcut objective needs the half-step network: pass teacher=build_teacher(...)")
        if draws is None:
            draws = self.draw(x, generator)
        tg = self.targets(teacher, x, y, draws)
        F = self.transport.model_output(net, tg["x_t"], tg["t"], tg["y"], level=tg["level"])
        per_row = (F - tg["target"]).square().mean(dim=tuple(range(1, F.ndim)))
        loss = per_row.mean() if weights is None else (per_row * weights).sum() / weights.sum()
        rows, L = tg["rows"], self.num_levels
        per = per_row.detach().float()
        logs = dict(tg["rms"])
        if rows < per.shape[0]:
            logs["loss_flow"] = per[rows:].mean()
        if rows:
            logs["loss_bootstrap"] = per[:rows].mean()
        counts = torch.zeros(L + 1, device=per.device).index_add_(0, tg["level"], torch.ones_like(per))  # no sync
        sums = torch.zeros(L + 1, device=per.device).index_add_(0, tg["level"], per)
        levels = self.layout(x.shape[0])[1]
        present = range(L + 1) if levels is None else sorted(set(levels) | ({L} if rows < per.shape[0] else set()))
        for lv in present:
            logs[f"loss_level{lv}"] = sums[lv] / counts[lv].clamp(min=1)
        if self.level_assignment == "random_uniform" and rows:
            for lv in range(L):
                logs[f"level_frac{lv}"] = counts[lv].float() / rows
        return loss, logs

    __call__ = loss

    def __repr__(self) -> str:
        return (f"ShortcutObjective(M={self.denoise_timesteps}, bootstrap_every={self.bootstrap_every}, "
                f"ema={self.bootstrap_ema}, cfg={self.bootstrap_cfg} w={self.cfg_scale}, "
                f"levels={self.level_assignment}{' biased' if self.bootstrap_dt_bias else ''})")


def shortcut_euler(net, noise: torch.Tensor, y, steps: int, transport: ShortcutLinear) -> torch.Tensor:
    """N = ``steps`` equal Euler steps at level log2 N from noise at t = 1 (helper_eval.py:150-166): x ← x − F/N with
    F = ``transport.model_output(net, x, t, y, level=log2 N)``, t = 1 − i/N; no clipping. Shared by
    :class:`ShortcutSampler` (images) and the per-token shortcut head (``y`` = condition rows)."""
    b, dev = noise.shape[0], noise.device
    level = torch.full((b,), int(math.log2(steps)), dtype=torch.long, device=dev)
    x = noise
    for i in range(steps):
        t = torch.full((b,), 1 - i / steps, dtype=torch.float32, device=dev)
        x = x - transport.model_output(net, x, t, y, level=level) * (1 / steps)
    return x


class ShortcutSampler:
    """Euler in N ∈ {1, 2, 4, ..., M} equal steps at level log2 N (helper_eval.py:150-166): from noise at t = 1,
    x ← x − F(x, t, y, log2 N)/N (= the reference's x + v/N at s = i/N), no clipping.

    ``cfg_scale``: 1 = conditional; 0 = unconditional (every row the null class, as the reference samples its
    unconditional models); otherwise v_unc + w·(v_c − v_unc), cond and uncond in one pass of 2B rows. Explicit
    guidance is right only at N = M, the plain flow model (the reference's "cfg" evaluation, L223-229): the levels
    below were trained on undropped labels and, with ``bootstrap_cfg``, already carry the guidance, so a warning
    says so for N < M. The loop is deterministic: on a GPU under ``module.cuda_graphs`` it replays as one CUDA graph
    per shape (:func:`~contgen.transport.solvers.replay_or_call`).
    """

    def __init__(self, steps: int = 1, denoise_timesteps: int = 128, cfg_scale: float = 1.0,
                 transport: str = "shortcut"):
        steps, denoise_timesteps = int(steps), int(denoise_timesteps)
        if not _power_of_two(denoise_timesteps):
            raise ValueError(f"sampler.denoise_timesteps must be a power of two, got {denoise_timesteps}")
        if not _power_of_two(steps) or steps > denoise_timesteps:
            raise ValueError(f"sampler.steps must be a power of two in [1, {denoise_timesteps}] (the level is log2 "
                             f"steps), got {steps}")
        if transport != "shortcut":
            raise ValueError(f"sampler.transport of the Shortcut sampler is 'shortcut', got {transport!r}")
        if cfg_scale < 0:
            raise ValueError(f"sampler.cfg_scale must be >= 0 (0: unconditional, 1: conditional), got {cfg_scale}")
        if cfg_scale not in (0.0, 1.0) and steps < denoise_timesteps:
            warnings.warn(f"sampler.cfg_scale={cfg_scale} at {steps} steps: explicit guidance is only valid at "
                          f"{denoise_timesteps} steps (the flow level); the shortcut levels never saw the null class "
                          "and, with bootstrap_cfg, already carry the distilled guidance", stacklevel=2)
        self.steps, self.denoise_timesteps, self.cfg_scale = steps, denoise_timesteps, float(cfg_scale)
        self.transport = ShortcutLinear()
        self._graphs = cuda_graphs.GraphCache()

    @property
    def num_iter(self) -> int:
        return self.steps

    @property
    def nfe(self) -> int:
        return self.steps

    @torch.no_grad()
    def __call__(self, net, noise: torch.Tensor, y: torch.Tensor | None, generator: torch.Generator | None = None):
        if self.cfg_scale == 0.0:
            y = torch.full((noise.shape[0],), net.num_classes, dtype=torch.long, device=noise.device)
        cfg = CFGDenoiser(net, self.cfg_scale)
        guided = functools.partial(cfg, guide=cfg.enabled)

        def loop(noise, y=None):
            return shortcut_euler(guided, noise, y, self.steps, self.transport)

        return replay_or_call(self._graphs, loop, net, dict(noise=noise, y=y), ("shortcut",))

    def __repr__(self) -> str:
        return f"ShortcutSampler(steps={self.steps}, M={self.denoise_timesteps}, cfg={self.cfg_scale})"


__all__ = ["LEVEL_ASSIGNMENTS", "ShortcutObjective", "ShortcutSampler", "bootstrap_levels", "shortcut_euler"]
