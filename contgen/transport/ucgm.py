"""UCGM-T, the unified training objective of UCGM (Sun et al. 2025), exactly as the reference builds it.

Reference: UCGM v2 (cccvs/UCGM @ ae74912) ``methodes/unigen.py`` ``UCGMTS.training_step`` (L225-307) with
``enhance_target`` (L216-223) and ``loss_func`` (L211-214); notes in ``shared/reference/ucgm.md`` §1.
Parity with that function is proven on fixtures made by the reference code
(``tests/fixtures/make_ucgm_training_fixtures.py``, ``tests/transport/test_ucgm_objective.py``).

One step, with t = 1 noise (internal convention, :mod:`contgen.transport.transports`) and x the data:

1. draws: t ~ Beta(a, b)·c clamped to [0, 1] (``time_dist_ctrl`` = [a, b, c]), z ~ N(0, I), a label-drop
   mask (dropped labels become the null class ``num_classes``);
2. online prediction F_θ(x_t, t, y) with x_t = α(t)z + γ(t)x (the only pass with gradient);
3. base target F* = α̂(t)z̃ + γ̂(t)x̃ with (x̃, z̃) = (x, z), or the *enhanced* pair (guidance baked into the
   target, ζ = ``enhanced_ratio``, three ``enhanced_style``s, see :meth:`UCGMObjective._enhance`);
4. λ = ``consistc_ratio`` ≠ 0: the consistency target F* = sg(F_θ) − (α(t)/den(t))·(4/sin(1.57t))·clip(Δ),
   Δ the finite-difference tangent of the data estimate x̂ along the (enhanced) trajectory, taken with the
   *online* weights under no_grad (θ⁻ = θ, not an EMA: the reference calls ``model.module``, L281);
   λ = 1: central difference (t ± ε)/2ε with ε = 0.005; λ ∈ (0, 1): backward difference to λt;
5. per-sample loss sqrt(mean((F_θ − F*)²) + c²) − c (c = ``scaled_cbl_eps``; c = 0 is the RMSE) or plain
   MSE, plus the optional channel cosine-direction loss, times the cos(1.57t) time weight, batch mean.

Deliberate differences from the reference code, none of which changes a number where the reference is
well defined:

* label drop by a boolean mask, never ``c[-ndrop:] = null`` (with ndrop = 0 that nulls *every* label and
  ``enhance_target``'s ``[:-0]`` slices are empty); ``lab_drop="last"`` drops the last round(ratio·B) rows as
  the reference does, ``"random"`` draws a Bernoulli mask; the caller's labels are not mutated;
* every random draw comes from an explicit ``torch.Generator`` (see :meth:`UCGMObjective.draw`);
* the cosine-direction loss keeps the batch dimension for (N, D) / (B, 2) tensors (the reference's
  ``mean_flat`` of a 1-D tensor, ``torch.mean(x, dim=[])``, averages over the batch; ucgm.md §5.2 T6);
* ζ ≥ 1 with λ = 0 is remapped to (ζ − 1)/ζ as unigen.py:172-173 does, but with a real warning (L174
  constructs a ``Warning`` it never raises);
* no CUDA RNG juggling (unigen.py:235 etc.): contgen denoisers have no internal dropout;
* no teacher is built or called unless the enhanced target needs it (see ``needs_teacher``).

Kept on purpose (it changes numbers): ``enhance_target`` writes into the reference's ``x`` and ``z`` *in place*
(L218-222 assign into views of ``xs_target`` / ``zs_target``, which *are* ``x`` and ``z``), so with
enhancement the consistency branch feeds the network the enhanced interpolant x̃_r = α(r)z̃ + γ(r)x̃, not
α(r)z + γ(r)x as L280 reads, and converts with the same x̃_r (L283). The fixtures record the mutated ``x``.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as Fn

from contgen.transport.transports import HALF_PI_REF, Transport, build_transport, expand_time

STYLES = ("ft-vs-fe", "fc-vs-fe", "fc-vs-xz")


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over all non-batch dims; a 1-D tensor is already per sample and is returned as is (the
    reference's ``torch.mean(x, dim=[])`` would average it over the batch)."""
    return x if x.ndim <= 1 else torch.mean(x, dim=list(range(1, x.ndim)))


def sample_beta(a: float, b: float, n: int, generator: torch.Generator | None = None,
                device: torch.device | str | None = None) -> torch.Tensor:
    """n draws of Beta(a, b) in float32 from ``generator``.

    ``torch.distributions.Beta(a, b).sample`` (the reference's ``sample_beta``, unigen.py:194-197) is
    ``torch._sample_dirichlet`` of the concentrations [a, b] (first coordinate) on the *global* RNG. The same op
    takes a generator, so this is the exact same sampler, driven by an explicit generator: with a CPU generator
    seeded s it returns bit for bit what ``torch.manual_seed(s); Beta(a, b).sample([n])`` returns (tested).
    """
    dev = generator.device if generator is not None else (device or "cpu")
    conc = torch.empty(n, 2, dtype=torch.float32, device=dev)  # filled from Python scalars: no host-to-device copy
    conc[:, 0], conc[:, 1] = float(a), float(b)
    return torch._sample_dirichlet(conc, generator=generator)[:, 0]


class UCGMObjective:
    """UCGM-T (unigen.py ``training_step``). Parameter names follow the reference's ``transport:`` YAML block
    (its names in brackets where they differ) so reference configs port one to one.

    Args:
        transport: ``linear`` | ``relinear`` | ``trigflow`` | ``triglinear`` | ``edm`` (case-insensitive, the
            reference's ``type``) or a :class:`Transport`.
        consistc_ratio: λ ∈ [0, 1]; 0 multi-step (flow matching / diffusion), 1 few-step (consistency).
        enhanced_ratio: ζ; 0 switches the enhanced target off. With λ = 0, ζ ≥ 1 is remapped to (ζ−1)/ζ.
        enhanced_style: ``ft-vs-fe`` | ``fc-vs-fe`` | ``fc-vs-xz`` (required when ζ ≠ 0).
        enhanced_range: open interval (t_min, t_max) of times that get the ζ rule (others: the averaging rule).
        scaled_cbl_eps: c of the per-sample loss sqrt(mean² + c²) − c (only with ``loss="rmse"``).
        loss: ``rmse`` (the reference's loss_func; pseudo-Huber for c > 0) or ``mse`` (plain mean square).
        wt_cosine_loss: add mean(1 − cos(F_θ, F*)) over dim 1 (channels of images, features of tokens).
        weight_function: ``cosine`` (cos(1.57t), every reference config) or None [weight_funcion].
        time_dist_ctrl: (a, b, c): t = clamp(Beta(a, b)·c, 0, 1).
        lab_drop_ratio: fraction of labels replaced by the null class ``num_classes``.
        lab_drop: ``last`` (the reference: the last round(ratio·B) rows, Python rounding) or ``random``.
        fd_eps: ε of the λ = 1 central difference (hard-coded 0.005 in the reference, L289).
        clip: elementwise clip of the finite-difference tangent (hard-coded 1 in the reference, L299).
        ema_decay_rate: the teacher policy, read by :meth:`build_teacher`: 0 online (no-grad online weights),
            (0, 1) EMA with the reference's ramped decay, 1 a frozen copy (of the init or of
            ``teacher_checkpoint``).
        teacher_checkpoint: optional state-dict file for a frozen teacher that differs from the init
            (the reference's issue #2 advice); ``teacher_checkpoint_key`` picks an entry (e.g. ``ema``).
    """

    def __init__(self, transport: str | Transport = "linear", consistc_ratio: float = 0.0,
                 enhanced_ratio: float = 0.0, enhanced_style: str | None = None,
                 enhanced_range=(0.0, 0.75), scaled_cbl_eps: float = 0.0, loss: str = "rmse",
                 wt_cosine_loss: bool = False, weight_function: str | None = "cosine",
                 time_dist_ctrl=(1.0, 1.0, 1.0), lab_drop_ratio: float = 0.1, lab_drop: str = "last",
                 fd_eps: float = 0.005, clip: float = 1.0, ema_decay_rate: float = 0.999,
                 teacher_checkpoint: str | None = None, teacher_checkpoint_key: str | None = None):
        self.transport = build_transport(transport)
        lam = float(consistc_ratio)
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"consistc_ratio (λ) must be in [0, 1], got {consistc_ratio}")
        self.consistc_ratio = lam
        zeta = float(enhanced_ratio)
        self.enhanced_ratio_given = zeta
        if zeta >= 1.0 and lam == 0.0:
            # unigen.py:172-174: for λ = 0 the ft-vs-fe fixed point F = m_c + ζ(F − m_∅) is CFG with w = 1/(1−ζ),
            # which diverges for ζ >= 1, so the reference reinterprets ζ as the effective scale w: ζ <- (ζ−1)/ζ.
            new = (zeta - 1.0) / zeta
            warnings.warn(f"UCGM: enhanced_ratio {zeta} >= 1 with consistc_ratio 0 is remapped to (ζ-1)/ζ = "
                          f"{new:.4g} as the reference does (unigen.py:172-173)", UserWarning, stacklevel=2)
            zeta = new
        self.enhanced_ratio = zeta
        if zeta != 0.0:
            if enhanced_style not in STYLES:
                raise ValueError(f"enhanced_style must be one of {STYLES} when enhanced_ratio != 0, "
                                 f"got {enhanced_style!r}")
        self.enhanced_style = enhanced_style if zeta != 0.0 else None
        self.enhanced_range = (float(enhanced_range[0]), float(enhanced_range[1]))
        if loss not in ("rmse", "mse"):
            raise ValueError(f"loss must be 'rmse' or 'mse', got {loss!r}")
        if loss == "mse" and scaled_cbl_eps != 0.0:
            raise ValueError("scaled_cbl_eps (c) belongs to loss='rmse' (sqrt(mean² + c²) − c); "
                             "use 0 with loss='mse'")
        self.loss_type, self.scaled_cbl_eps = loss, float(scaled_cbl_eps)
        self.wt_cosine_loss = bool(wt_cosine_loss)
        wf = None if weight_function in (None, "none", "None") else str(weight_function).lower()
        if wf not in (None, "cosine"):
            raise ValueError(f"weight_function must be 'cosine' or None, got {weight_function!r}")
        self.weight_function = wf
        if len(time_dist_ctrl) != 3:
            raise ValueError(f"time_dist_ctrl must be [a, b, c], got {time_dist_ctrl}")
        self.time_dist_ctrl = tuple(float(v) for v in time_dist_ctrl)
        if not 0.0 <= lab_drop_ratio <= 1.0:
            raise ValueError(f"lab_drop_ratio must be in [0, 1], got {lab_drop_ratio}")
        if lab_drop not in ("last", "random"):
            raise ValueError(f"lab_drop must be 'last' or 'random', got {lab_drop!r}")
        self.lab_drop_ratio, self.lab_drop = float(lab_drop_ratio), lab_drop
        self.fd_eps, self.clip = float(fd_eps), float(clip)
        if not 0.0 <= ema_decay_rate <= 1.0:
            raise ValueError(f"ema_decay_rate must be in [0, 1], got {ema_decay_rate}")
        self.ema_decay_rate = float(ema_decay_rate)
        if teacher_checkpoint is not None and self.ema_decay_rate != 1.0:
            raise ValueError("teacher_checkpoint needs a frozen teacher (ema_decay_rate: 1.0)")
        self.teacher_checkpoint, self.teacher_checkpoint_key = teacher_checkpoint, teacher_checkpoint_key

    # -- teacher ----------------------------------------------------------------------------------------
    @property
    def needs_teacher(self) -> bool:
        """True iff the enhanced target is on (ζ ≠ 0): the reference reads ``mod`` only there (L250-269). It
        also builds and EMA-updates one when λ ≠ 0, ζ = 0 (L240) but never reads it; the consistency branch
        uses the online weights (L281)."""
        return self.enhanced_ratio != 0.0

    def setup(self, batch_size: int, world_size: int = 1, rank: int = 0) -> None:
        """The objective interface's hook for the batch layout before training: UCGM-T's rows are independent."""

    def build_teacher(self, net: torch.nn.Module, ema: torch.nn.Module | None = None):
        """The teacher for ``net`` (build it after the init weights are loaded), or None if not needed. UCGM's
        teacher keeps its own ramped EMA (teacher.py), so the module's EMA copy ``ema`` is not used."""
        if not self.needs_teacher:
            return None
        from contgen.transport.teacher import build_teacher
        return build_teacher(net, self.ema_decay_rate, checkpoint=self.teacher_checkpoint,
                             key=self.teacher_checkpoint_key)

    # -- random draws -----------------------------------------------------------------------------------
    def draw(self, x: torch.Tensor, y: torch.Tensor | None = None, num_classes: int | None = None,
             generator: torch.Generator | None = None) -> dict:
        """The step's random draws, in the reference's order: ``t`` (B,), ``z`` like x, ``drop`` (B,) bool.

        t ~ Beta(a, b) by :func:`sample_beta` (the reference's sampler, on ``generator``), then
        clamp(t·c, 0, 1) (unigen.py:226-227); kept in float32 (float64 if x is). z ~ N(0, I) by ``torch.randn``
        on the same generator (= ``randn_like(x)`` of L228 for the same RNG state). ``drop``: the last
        round(ratio·B) rows (``lab_drop="last"``, L230-231, Python's round as the reference) or Bernoulli(ratio)
        drawn last. ``generator`` must live on x's device (or be None: the global RNG). With a CPU generator
        seeded s these are bit for bit the reference's draws after ``torch.manual_seed(s)``.
        """
        n = x.shape[0]
        a, b, c = self.time_dist_ctrl
        tdtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        t = sample_beta(a, b, n, generator, device=x.device).to(device=x.device, dtype=tdtype)
        t = torch.clamp(t * c, min=0, max=1)
        z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        if y is None or num_classes is None or self.lab_drop_ratio == 0.0:
            drop = torch.zeros(n, dtype=torch.bool, device=x.device)
        elif self.lab_drop == "last":
            ndrop = round(self.lab_drop_ratio * n)
            drop = torch.arange(n, device=x.device) >= n - ndrop
        else:
            drop = torch.rand(n, generator=generator, device=x.device) < self.lab_drop_ratio
        return {"t": t, "z": z, "drop": drop}

    # -- target -----------------------------------------------------------------------------------------
    def _enhance(self, v, in_range, drop, pred_c, ref):
        """enhance_target (unigen.py:216-223) by masks, for x̃ (v = x) or z̃ (v = z):
        in range and kept: v + ζ(pred_c − ref); out of range and kept: (v + pred_c)/2; dropped: (v + ref)/2."""
        ir, dr = expand_time(in_range, v), expand_time(drop, v)
        boosted = v + self.enhanced_ratio * (pred_c - ref)
        return torch.where(dr, (v + ref) * 0.50, torch.where(ir, boosted, (v + pred_c) * 0.50))

    def predict_and_target(self, net, x: torch.Tensor, y: torch.Tensor | None, draws: dict, teacher=None):
        """(F_θ with gradient, the detached target F*, logs). Labels are dropped by ``draws["drop"]``."""
        tr = self.transport
        t, z = draws["t"], draws["z"]
        nc = getattr(net, "num_classes", None)
        if y is not None and nc is not None:
            yd = torch.where(draws["drop"], torch.full_like(y, nc), y)
        else:
            yd = y
        x_t = tr.interpolate(x, z, t)
        F = tr.model_output(net, x_t, t, yd)
        if F.dtype in (torch.float16, torch.bfloat16):  # targets and loss in fp32 (under autocast)
            F = F.float()
        logs = {}
        with torch.no_grad():
            Fd = F.detach()
            xs, zs = x, z
            if self.enhanced_ratio != 0.0:
                if teacher is None:
                    raise ValueError("the enhanced target (enhanced_ratio != 0) needs a teacher: "
                                     "pass teacher=objective.build_teacher(net)")
                if yd is None:
                    raise ValueError("the enhanced target needs class labels")
                null = torch.full_like(yd, nc)
                style = self.enhanced_style
                if style == "fc-vs-fe":  # L251-257: teacher, conditional vs null label
                    ref_x, ref_z, _ = tr.predict(teacher, x_t, t, null)
                    pc_x, pc_z, _ = tr.predict(teacher, x_t, t, yd)
                elif style == "ft-vs-fe":  # L258-263: online prediction (detached) vs teacher with null label
                    ref_x, ref_z, _ = tr.predict(teacher, x_t, t, null)
                    pc_x, pc_z = tr.estimates(Fd, x_t, t)
                else:  # fc-vs-xz, L264-267: teacher conditional vs ground truth (x, z)
                    ref_x, ref_z = x, z
                    pc_x, pc_z, _ = tr.predict(teacher, x_t, t, yd)
                lo, hi = self.enhanced_range
                in_range = (t < hi) & (t > lo)  # L271, open interval
                xs = self._enhance(x, in_range, draws["drop"], pc_x, ref_x)
                zs = self._enhance(z, in_range, draws["drop"], pc_z, ref_z)
            target = tr.target(xs, zs, t)  # L237 / L274
            if self.consistc_ratio != 0.0:
                target = self._consistency_target(net, tr, t, xs, zs, yd, Fd, logs)
        return F, target, logs

    def _consistency_target(self, net, tr, t, xs, zs, yd, Fd, logs):
        """unigen.py:276-301. x̂ along the (enhanced) trajectory with the online weights, no grad."""
        tt = expand_time(t, xs)

        def fx(r):  # f^x at time r: input x̃_r (the reference's in-place aliasing, module docstring), online net
            return tr.predict(net, tr.interpolate(xs, zs, r), r, yd)[0]

        lam = self.consistc_ratio
        if lam == 1.0:  # central difference, L288-291
            inv = 1 / (2 * self.fd_eps)
            tangent = fx(t + self.fd_eps) * inv - fx(t - self.fd_eps) * inv
        else:  # backward difference from λt to t, L292-297; the t end is the online F_θ at the *un*-enhanced x_t
            eps = t - lam * t
            inv = 1 / expand_time(eps, xs)
            x_hat_t = tr.estimates(Fd, tr.interpolate(xs, zs, t), t)[0]
            tangent = x_hat_t * inv - fx(t - eps) * inv
        logs["clip_frac"] = (tangent.abs() > self.clip).float().mean()
        tangent = torch.clamp(tangent, min=-self.clip, max=self.clip)
        weight = 4 / torch.sin(tt * HALF_PI_REF)  # L300
        a, den = tr.alpha_in(tt), tr.den(tt)
        return Fd - (a / den * weight).to(Fd.dtype) * tangent  # L301

    # -- loss -------------------------------------------------------------------------------------------
    def per_sample_loss(self, F: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """loss_func (unigen.py:211-214): (B,) per-sample loss."""
        msq = mean_flat((F - target) ** 2)
        loss = msq if self.loss_type == "mse" else torch.sqrt(msq + self.scaled_cbl_eps**2) - self.scaled_cbl_eps
        if self.wt_cosine_loss:
            loss = loss + mean_flat(1 - Fn.cosine_similarity(F, target, dim=1))
        return loss

    def time_weight(self, t: torch.Tensor) -> torch.Tensor | None:
        """cos(1.57t) for ``weight_function: cosine`` (L306-307), else None."""
        return torch.cos(t * HALF_PI_REF) if self.weight_function == "cosine" else None

    def loss(self, net, x: torch.Tensor, y: torch.Tensor | None = None, generator: torch.Generator | None = None,
             teacher=None, draws: dict | None = None):
        """(scalar loss, dict of detached logs). ``draws`` (from :meth:`draw`) replaces the random draws.

        ``teacher`` is the callable ``teacher(x, t_native, y) -> F`` (a :class:`~contgen.transport.teacher.
        Teacher`), only read when ``needs_teacher``. Its EMA update (``teacher.update(net)``) is the
        caller's, once per step *before* this call, as the reference updates ``mod`` at the start of the step
        (L241-244).
        """
        if draws is None:
            draws = self.draw(x, y, getattr(net, "num_classes", None), generator)
        F, target, logs = self.predict_and_target(net, x, y, draws, teacher)
        per = self.per_sample_loss(F, target)
        w = self.time_weight(draws["t"])
        loss = (per if w is None else per * w.to(per.dtype)).mean()
        logs.update(loss=loss.detach(), loss_unweighted=per.detach().mean())
        return loss, logs

    __call__ = loss

    def __repr__(self) -> str:
        return (f"UCGMObjective({self.transport.name}, λ={self.consistc_ratio}, ζ={self.enhanced_ratio} "
                f"{self.enhanced_style or ''}, loss={self.loss_type} c={self.scaled_cbl_eps}, "
                f"cos_loss={self.wt_cosine_loss}, weight={self.weight_function}, t~{self.time_dist_ctrl})")


def flow_matching(transport: str = "linear", lab_drop_ratio: float = 0.1, lab_drop: str = "random",
                  time_dist_ctrl=(1.0, 1.0, 1.0)) -> UCGMObjective:
    """Plain flow matching: λ = 0, no enhancement, MSE, no time weight (``conf/objective/flow.yaml``)."""
    return UCGMObjective(transport, consistc_ratio=0.0, loss="mse", weight_function=None,
                         lab_drop_ratio=lab_drop_ratio, lab_drop=lab_drop, time_dist_ctrl=time_dist_ctrl)


__all__ = ["STYLES", "UCGMObjective", "flow_matching", "mean_flat", "sample_beta"]
