"""The UCGM teacher ("stop-grad model" ``mod``) that the enhanced target reads: online, EMA or frozen.

Reference: UCGM v2 (cccvs/UCGM @ ae74912) ``methodes/unigen.py:239-248`` (policy by ``ema_decay_rate`` = emd)
and ``update_ema`` (L43-63); ucgm.md §1.5.

* ``online`` (emd = 0): the online weights under no_grad (the reference's ``mod = model.module``). Holds no
  copy and contributes nothing to the state dict.
* ``ema`` (0 < emd < 1): an EMA of the online weights with the reference's *ramped* decay: the decay used at
  update k is cmd_k with cmd_0 = 0 and cmd_{k+1} = cmd_k + (1 − cmd_k)(emd − cmd_k)/2 (L243-244), i.e.
  ≈ 1 − 2/k early (0.99 after ~200 updates) and → emd. The first update copies the online weights. Only
  parameters are averaged (``update_ema`` walks ``named_parameters``); buffers stay as copied.
* ``frozen`` (emd = 1): a frozen copy of the weights the teacher was built from (the init checkpoint) or,
  with ``state_dict`` / :func:`load_teacher_state`, of a *different* checkpoint — the reference's issue #2
  fix (a converged teacher, an earlier trainable init), which the reference can only do by hand.

:class:`Teacher` is an ``nn.Module``: its copy and the ramp state (buffer ``decay_now``) are in the state dict
of whatever module owns it, so a resumed run continues the same teacher. Its parameters never require grad
(exclude them from the optimizer, e.g. filter on ``requires_grad``). Call it like the denoiser:
``teacher(x, t_native, y) -> F``, always under no_grad.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

POLICIES = ("online", "ema", "frozen")


class Teacher(nn.Module):
    """Teacher network for the UCGM enhanced target; see the module docstring for the three policies."""

    def __init__(self, net: nn.Module, policy: str = "ema", ema_decay_rate: float = 0.999,
                 state_dict: dict | None = None):
        super().__init__()
        if policy not in POLICIES:
            raise ValueError(f"teacher policy must be one of {POLICIES}, got {policy!r}")
        if policy == "ema" and not 0.0 < ema_decay_rate < 1.0:
            raise ValueError(f"an EMA teacher needs 0 < ema_decay_rate < 1, got {ema_decay_rate}")
        if state_dict is not None and policy != "frozen":
            raise ValueError("a teacher state_dict (separate checkpoint) is only for policy='frozen'")
        self.policy, self.ema_decay_rate = policy, float(ema_decay_rate)
        self.num_classes = getattr(net, "num_classes", None)
        if policy == "online":
            # a plain list, not a submodule: the online weights belong to (and are saved with) the online model
            self._online = [net]
            self.net = None
        else:
            self.net = copy.deepcopy(net).requires_grad_(False)
            if state_dict is not None:
                self.net.load_state_dict(state_dict, strict=True)
        # the ramped decay of the *next* update (cmd); in the state dict for exact resume, mirrored on the host so
        # that reading it never syncs with the device
        self.register_buffer("decay_now", torch.zeros((), dtype=torch.float64))
        self._decay = 0.0

    @property
    def module(self) -> nn.Module:
        """The network the teacher evaluates."""
        return self._online[0] if self.policy == "online" else self.net

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None, **cond) -> torch.Tensor:
        with torch.no_grad():
            return self.module(x, t, y, **cond)

    @torch.no_grad()
    def update(self, online: nn.Module) -> None:
        """One step of the policy, called once per training step *before* the loss (unigen.py:241-244):
        EMA with decay cmd, then cmd += (1 − cmd)(emd − cmd)/2; a no-op for ``online`` and ``frozen``."""
        if self.policy != "ema":
            return
        d = self._decay
        mine = dict(self.net.named_parameters())
        names = [n for n, _ in online.named_parameters()]
        missing = [n for n in names if n not in mine]
        if missing:
            raise KeyError(f"teacher has no parameter(s) {missing[:5]} of the online model")
        ema = [mine[n] for n in names]
        cur = [p.detach() for _, p in online.named_parameters()]
        # ema.mul_(d).add_(p, alpha=1 - d) as update_ema (L53), fused; the same rounding as the reference
        torch._foreach_mul_(ema, d)
        torch._foreach_add_(ema, cur, alpha=1 - d)
        self._decay = d + (1 - d) * (self.ema_decay_rate - d) * 0.5
        self.decay_now.fill_(self._decay)

    @torch.no_grad()
    def copy_from(self, net: nn.Module) -> None:
        """Re-copy ``net``'s weights into the teacher (``ema`` / ``frozen``) and restart the EMA ramp: for a caller
        that loads the init weights *after* building the teacher (the reference copies at its first step)."""
        if self.net is None:
            return
        self.net.load_state_dict(net.state_dict(), strict=True)
        self._decay = 0.0
        self.decay_now.zero_()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "decay_now" in state_dict:
            self._decay = float(state_dict[prefix + "decay_now"])

    def train(self, mode: bool = True) -> "Teacher":
        # the reference keeps its copy in train mode (deepcopy(model).train(), L242/248); contgen denoisers have no
        # dropout, so the mode only matters for modules that would add randomness: keep the copy in eval
        super().train(mode)
        if self.net is not None:
            self.net.eval()
        return self

    def extra_repr(self) -> str:
        return f"policy={self.policy}, ema_decay_rate={self.ema_decay_rate}"


def load_teacher_state(path: str | Path, key: str | None = None, prefix: str = "") -> dict:
    """A network state dict from ``path`` (``torch.load(weights_only=True)``).

    ``key`` picks an entry of a checkpoint dict (dots walk nested dicts: the reference's ``ema`` or ``model``,
    a Lightning checkpoint's ``state_dict``); without it, ``ema`` then ``model`` are tried, else the file is
    taken as the state dict itself. Keys starting with ``prefix`` keep only the rest (e.g. ``net.``), and
    a DDP ``module.`` prefix is stripped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"teacher checkpoint {path} not found (objective.teacher_checkpoint)")
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if key is not None:
        for part in key.split("."):
            if not isinstance(sd, dict) or part not in sd:
                raise KeyError(f"teacher checkpoint {path} has no entry {key!r} (objective.teacher_checkpoint_key)")
            sd = sd[part]
    elif isinstance(sd, dict) and not all(isinstance(v, torch.Tensor) for v in sd.values()):
        for k in ("ema", "model"):
            if isinstance(sd.get(k), dict):
                sd = sd[k]
                break
    if prefix:
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return {k.removeprefix("module."): v for k, v in sd.items()}


def build_teacher(net: nn.Module, ema_decay_rate: float, checkpoint: str | Path | dict | None = None,
                  key: str | None = None, prefix: str = "") -> Teacher:
    """The reference's policy from ``ema_decay_rate`` (unigen.py:241-248): 0 online, (0, 1) EMA, 1 frozen
    (a copy of ``net``'s current weights, or of ``checkpoint``: a path or a state dict)."""
    emd = float(ema_decay_rate)
    if emd == 0.0:
        policy = "online"
    elif emd == 1.0:
        policy = "frozen"
    elif 0.0 < emd < 1.0:
        policy = "ema"
    else:
        raise ValueError(f"ema_decay_rate must be in [0, 1], got {ema_decay_rate}")
    sd = None
    if checkpoint is not None:
        sd = checkpoint if isinstance(checkpoint, dict) else load_teacher_state(checkpoint, key, prefix)
    return Teacher(net, policy, emd if policy == "ema" else 0.999, state_dict=sd)


__all__ = ["POLICIES", "Teacher", "build_teacher", "load_teacher_state"]
