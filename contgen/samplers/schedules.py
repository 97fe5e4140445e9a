"""Schedules of the masked (random-order) autoregressive family, shared by MAR and EAR.

All of them are computed on the host from integers known before sampling starts, so the sampling
loop never has to read a device value back (no host syncs) and every step has a static shape.
"""

from __future__ import annotations

import math

import torch
from scipy.stats import truncnorm


def random_orders(batch: int, seq_len: int, generator: torch.Generator | None = None,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """One uniformly random permutation of ``range(seq_len)`` per row, drawn on ``device``."""
    return torch.rand(batch, seq_len, generator=generator, device=device).argsort(dim=1)


def mask_from_order(order: torch.Tensor, num_masked: int) -> torch.Tensor:
    """Boolean mask, True at the ``num_masked`` positions that come first in each row's order."""
    mask = torch.zeros(order.shape, dtype=torch.bool, device=order.device)
    return mask.scatter_(1, order[:, :num_masked], True)


class MaskRatio:
    """Training mask ratio r ~ N(mean, std²) truncated to [low, 1] (MAR Sec. 3.4; mar.py:65-66).

    MAR draws one ratio per batch and masks ``ceil(seq_len · r)`` tokens, so every row of a batch has
    the same number of masked tokens and all downstream gathers have static shapes.
    The draw is on the host (CPU generator): it decides a shape, not a tensor value.
    """

    def __init__(self, low: float = 0.7, mean: float = 1.0, std: float = 0.25):
        if not 0.0 < low <= 1.0:
            raise ValueError(f"mask ratio lower bound must be in (0, 1], got {low}")
        self.dist = truncnorm((low - mean) / std, (1.0 - mean) / std, loc=mean, scale=std)

    def min_masked(self, seq_len: int) -> int:
        """A lower bound on :meth:`num_masked` (its count at u = 0, less one for the ppf's rounding)."""
        return max(1, min(seq_len, math.ceil(seq_len * float(self.dist.ppf(0.0)))) - 1)

    def num_masked(self, seq_len: int, generator: torch.Generator | None = None) -> int:
        u = torch.rand((), generator=generator).item()  # CPU generator: no device sync
        return max(1, min(seq_len, math.ceil(seq_len * float(self.dist.ppf(u)))))


class CosineMaskCount:
    """MaskGIT's training mask count (DiGIT's NAR pixel decoder; DiGIT cd6d8ca
    ``fairseq_user/image_generation_stage2/model_nar.py:276-294``): u ~ U(0, 1), and

        num_masked = floor(L · cos(u · π/2) + 1), at most L,

    so P(num_masked >= k) = (2/π) · arccos((k − 1)/L) for k = 1..L: every count from 1 to L is possible, small ones
    less often (mean ≈ 2L/π + ½). Same interface as :class:`MaskRatio` (``module.mask_ratio: cosine``).

    Documented deviation: DiGIT draws u per sample (each row of a batch masks its own count); contgen draws ONE
    count per batch on the host CPU generator, like MAR's :class:`MaskRatio`, so every gather has a static shape.
    """

    def num_masked(self, seq_len: int, generator: torch.Generator | None = None) -> int:
        u = torch.rand((), generator=generator).item()  # CPU generator: no device sync
        return min(seq_len, math.floor(seq_len * math.cos(u * math.pi / 2) + 1))

    def min_masked(self, seq_len: int) -> int:
        return 1


MASK_RATIOS = {"truncnorm": MaskRatio, "cosine": CosineMaskCount}


def make_mask_ratio(name: str, low: float = 0.7) -> MaskRatio | CosineMaskCount:
    """``module.mask_ratio``: ``truncnorm`` (MAR: truncated normal on [``mask_ratio_min``, 1]) or ``cosine``
    (MaskGIT / DiGIT; ``mask_ratio_min`` unused)."""
    if name == "truncnorm":
        return MaskRatio(low=low)
    if name == "cosine":
        return CosineMaskCount()
    raise ValueError(f"module.mask_ratio must be one of {sorted(MASK_RATIOS)}, got {name!r}")


def cosine_mask_schedule(seq_len: int, num_iter: int) -> list[int]:
    """Number of tokens still masked *after* each of ``num_iter`` steps (MaskGIT cosine; mar.py:292-305).

    ``mask_len = floor(L · cos(π/2 · (k+1)/num_iter))``, clamped so that every step predicts at least
    one token and leaves at least one for later; the last step predicts everything left. The result
    is strictly decreasing and ends at 0; ``num_iter == seq_len`` predicts exactly one token per step.
    """
    if not 1 <= num_iter <= seq_len:
        raise ValueError(f"sampler.num_iter must be in [1, {seq_len}] (sequence length), got {num_iter}")
    masked, out = seq_len, []
    for k in range(num_iter):
        if k == num_iter - 1:
            nxt = 0
        else:
            nxt = math.floor(seq_len * math.cos(math.pi / 2 * (k + 1) / num_iter))
            nxt = max(1, min(nxt, masked - 1))
        out.append(nxt)
        masked = nxt
    return out


def cfg_schedule(cfg: float, schedule: str, seq_len: int, mask_len_next: int) -> float:
    """Guidance scale of one step: ``constant``, or ``linear`` ramping 1 → cfg as tokens are generated
    (Muse-style, mar.py:312-318): ``1 + (cfg − 1) · (L − m) / L``.

    ``m`` is the reference's ``mask_len``, which is clamped to ≥ 1 *before* the scale is computed, also on the
    last step where nothing stays masked (mar.py:296-318, EAR ear.py:258-281). So the last scale is
    ``1 + (cfg − 1)(L − 1)/L`` (2.8926 at cfg 2.9, L 256), never exactly ``cfg``.
    """
    if schedule == "constant":
        return cfg
    if schedule == "linear":
        return 1.0 + (cfg - 1.0) * (seq_len - max(1, mask_len_next)) / seq_len
    raise ValueError(f"sampler.cfg_schedule must be 'linear' or 'constant', got {schedule!r}")
