"""Optimizer parameter groups and the learning-rate schedule of MAR / EAR (mar.md §4, ear.md §1.4)."""

from __future__ import annotations

import math

from torch import nn


def param_groups(backbone: nn.Module, head: nn.Module | None, weight_decay: float, head_lr_scale: float = 1.0,
                 ndims: dict[int, int] | None = None) -> list[dict]:
    """Three AdamW groups, following the reference rules.

    * backbone weight matrices (ndim ≥ 2, not biases): ``weight_decay``;
    * every 1-D parameter and bias, backbone or head: no decay, full LR;
    * head weight matrices: no decay, LR × ``head_lr_scale``.

    MAR excludes its whole head from decay (util/misc.py:297) and has no LR scale (1.0). EAR scales only the
    generator's *matrices* by ``score_lrscale`` 0.25 — its biases and norms fall in the 1-D rule and train at
    the full LR (util/misc.py:290-306); that quirk is kept. ``lr_scale`` is read by the schedule. A denoiser
    without a head (the transport family) has the first two groups only. ``ndims`` (``id(param)`` → dims as built)
    classifies parameters that FSDP has already flattened into 1-D shard pieces.
    """
    decay, no_decay, head_mats = [], [], []
    for module, is_head in ((backbone, False), (head if head is not None else nn.Module(), True)):
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            if (ndims or {}).get(id(p), p.ndim) <= 1 or name.endswith(".bias"):
                no_decay.append(p)
            elif is_head:
                head_mats.append(p)
            else:
                decay.append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "lr_scale": 1.0, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0, "name": "no_decay"},
        {"params": head_mats, "weight_decay": 0.0, "lr_scale": head_lr_scale, "name": "head"},
    ]
    return [g for g in groups if g["params"]]


def warmup_then(step: int, warmup_steps: int, total_steps: int, schedule: str, min_lr_ratio: float = 0.0) -> float:
    """LR multiplier: linear warm-up from 0 over ``warmup_steps`` (per iteration, util/lr_sched.py), then
    ``constant`` (the MAR/EAR recipe), half-cycle ``cosine`` down to ``min_lr_ratio``, or ``inverse_sqrt``
    √(warmup_steps / step) (fairseq's ``inverse_sqrt``, DiGIT's recipe; fairseq warms up from 1e-7, not 0)."""
    if step < warmup_steps:
        return step / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    if schedule == "inverse_sqrt":
        return math.sqrt(warmup_steps / step) if warmup_steps else 1.0
    raise ValueError(f"optim.schedule must be 'constant', 'cosine' or 'inverse_sqrt', got {schedule!r}")
