"""``DataModule``: one training data set (images or cached tokens) behind a seeded, resumable sampler."""

from __future__ import annotations

import lightning as L
from torch.utils.data import DataLoader, Dataset

from contgen.data.sampling import EpochSampler


class DataModule(L.LightningDataModule):
    def __init__(self, train: Dataset, batch_size: int = 64, num_workers: int = 2, seed: int = 0, pin_memory: bool = True):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        if len(train) < batch_size:
            raise ValueError(f"data: the training set has {len(train)} samples, fewer than data.batch_size={batch_size}")
        self.train_set, self.batch_size, self.num_workers, self.seed, self.pin_memory = train, batch_size, num_workers, seed, pin_memory

    @property
    def num_classes(self) -> int:
        return self.train_set.num_classes

    @property
    def image_size(self) -> int:
        return self.train_set.image_size

    def train_dataloader(self) -> DataLoader:
        # EpochSampler: the order of epoch e depends only on (seed, e), so a resumed run sees the same batches
        return DataLoader(self.train_set, batch_size=self.batch_size, sampler=EpochSampler(len(self.train_set), self.seed),
                          num_workers=self.num_workers, drop_last=True, pin_memory=self.pin_memory,
                          persistent_workers=self.num_workers > 0)
