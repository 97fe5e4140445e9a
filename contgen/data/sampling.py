"""A resumable shuffling sampler: the order of epoch e depends only on (seed, e)."""

from __future__ import annotations

import torch
from torch.utils.data import Sampler


class EpochSampler(Sampler[int]):
    """``randperm(n)`` seeded by ``seed + epoch``. Lightning calls ``set_epoch`` on samplers that have it, so a
    run resumed at epoch e draws the same order; ``resume_at(epoch, n)`` also skips the first ``n`` indices of
    that epoch once (the samples a killed run had already consumed).

    ``stream=True`` is for endless procedural data sets (``Shapes(fresh_each_epoch=True)``): epoch e reads
    indices ``e·n … e·n + n − 1``, so no sample is seen twice.

    Under several processes (``set_rank``) the sampler deals the epoch out itself (Lightning's distributed wrapper
    would reshuffle it and cannot skip): rank r of W takes positions r, r + W, … of what is left of the order, cut to
    a multiple of W so that every rank runs the same number of steps. Batch j of every rank then comes from
    positions j·B·W … (j+1)·B·W − 1: each optimizer step sees the same samples whatever W is, for one global batch,
    and a run resumed on another device count continues the same data order."""

    def __init__(self, num_samples: int, seed: int = 0, shuffle: bool = True, stream: bool = False):
        self.num_samples, self.seed, self.shuffle, self.stream, self.epoch = num_samples, seed, shuffle, stream, 0
        self.rank, self.world = 0, 1
        self._skip: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_rank(self, rank: int, world: int) -> None:
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside a world of {world}")
        self.rank, self.world = rank, world

    def resume_at(self, epoch: int, consumed: int) -> None:
        self._skip = (epoch, consumed)

    def __iter__(self):
        if self.shuffle:
            order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.num_samples)
        start = 0
        if self._skip is not None and self._skip[0] == self.epoch:
            start, self._skip = self._skip[1], None
        if self.stream:
            order = order + self.epoch * self.num_samples
        order = order[start:]
        return iter(order[: len(order) // self.world * self.world][self.rank::self.world].tolist())

    def __len__(self) -> int:
        return self.num_samples // self.world
