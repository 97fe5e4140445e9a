"""Exponential moving average of a module's parameters, updated with one fused foreach op per step.

The reference MAR updates its EMA with a Python loop over parameters, which costs ~20% of a step on an
H100 (mar.md §6); ``torch._foreach_lerp_`` does the same update, ``ema ← ema + (1 − decay)·(p − ema)``, in
a handful of kernels.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA(nn.Module):
    """Holds ``shadow``, a frozen copy of ``model``; persistent buffers are copied, not averaged."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = False):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"optim.ema_decay must be in [0, 1), got {decay}")
        self.decay, self.warmup = decay, warmup
        # updates so far: in the state dict (an exact resume continues the warm-up where it was) and mirrored on the
        # host, so that reading it never syncs with the device
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        self._updates = 0
        self.shadow = copy.deepcopy(model).requires_grad_(False).eval()
        # Only buffers in the state dict may change in training; non-persistent ones (noise schedules, timestep
        # maps) are constants built from the config, so copying them every step would be wasted bandwidth.
        state = model.state_dict(keep_vars=True)
        self._state_buffers = [name for name, _ in model.named_buffers() if name in state]

    def train(self, mode: bool = True) -> "EMA":  # the shadow never trains (dropout off when sampling)
        return super().train(False)

    def current_decay(self) -> float:
        """``decay``, or with ``warmup`` min(decay, (1 + n)/(10 + n)) after n updates (the ramp of TF's
        ExponentialMovingAverage num_updates and timm's ModelEmaV2 warm-up): early updates average over a short
        window, so a short run's EMA is not dominated by the initial weights. The references use no warm-up."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self._updates) / (10 + self._updates))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "num_updates" in state_dict:
            self._updates = int(state_dict[prefix + "num_updates"])

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema = [p for p in self.shadow.parameters()]
        cur = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema, cur, 1.0 - self.current_decay())
        self.num_updates += 1
        self._updates += 1
        if self._state_buffers:
            mine, theirs = dict(self.shadow.named_buffers()), dict(model.named_buffers())
            torch._foreach_copy_([mine[n] for n in self._state_buffers], [theirs[n] for n in self._state_buffers])
