"""``DataModule``: one training data set (images or cached tokens) behind a seeded, resumable sampler."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from contgen.data.sampling import EpochSampler


class DataModule(L.LightningDataModule):
    def __init__(self, train: Dataset, batch_size: int = 64, num_workers: int = 2, seed: int = 0, pin_memory: bool | None = None,
                 image_size: int | None = None, root: str | None = None, shards: str | None = None):
        """``image_size``, ``root`` and ``shards`` are the user-facing keys the data set config interpolates
        (``data.image_size``, ``data.root``, ``data.shards``); they are checked against the data set it built.
        ``pin_memory``: None = only when CUDA is there (pinned memory speeds up host-to-GPU copies and does nothing
        on a CPU run)."""
        super().__init__()
        if image_size is not None and getattr(train, "image_size", image_size) != image_size:
            raise ValueError(f"data.image_size={image_size} but the data set has image_size={train.image_size} "
                             "(a token cache fixes its resolution: see its meta.json)")
        if root is not None and str(getattr(train, "root", root)) != str(root):
            raise ValueError(f"data.root={root} but the data set reads {train.root}")
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        if len(train) < batch_size:
            raise ValueError(f"data: the training set has {len(train)} samples, fewer than data.batch_size={batch_size}")
        pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.train_set, self.batch_size, self.num_workers, self.seed, self.pin_memory = train, batch_size, num_workers, seed, pin_memory
        if isinstance(train, IterableDataset):
            self.sampler = self._stream_sampler(train, batch_size, num_workers, shards)
        else:
            self.sampler = EpochSampler(len(train), seed, stream=getattr(train, "fresh_each_epoch", False))

    # --- WebDataset shards (contgen.data.webdataset): an iterable stream that deals its epochs out to the ranks,
    # shuffles, and resumes mid-epoch itself, so it stands in for the sampler (set_rank, set_epoch, resume_at)
    @staticmethod
    def _stream_sampler(train, batch_size: int, num_workers: int, shards: str | None):
        for key, value in (("batch_size", batch_size), ("num_workers", num_workers), ("shards", shards)):
            if value is not None and getattr(train, key) != value:
                raise ValueError(f"data.{key}={value} but the stream has {key}={getattr(train, key)} "
                                 f"(data.train.{key} interpolates data.{key})")
        return train

    def _stream_dataloader(self) -> DataLoader:
        loop = self.trainer.fit_loop
        return self.train_set.loader(self.trainer.global_rank, self.trainer.world_size,
                                     lambda: loop.epoch_progress.current.processed, self.pin_memory)

    @property
    def num_classes(self) -> int:
        return self.train_set.num_classes

    @property
    def image_size(self) -> int:
        return self.train_set.image_size

    def train_dataloader(self) -> DataLoader:
        if isinstance(self.train_set, IterableDataset):
            return self._stream_dataloader()
        # EpochSampler: the order of epoch e depends only on (seed, e), so a resumed run sees the same batches; it
        # deals the order out to the ranks itself (trainer.use_distributed_sampler is off)
        if self.trainer is not None:  # a loader made outside a Trainer reads the whole epoch
            self.sampler.set_rank(self.trainer.global_rank, self.trainer.world_size)
        return ResumableDataLoader(self.train_set, batch_size=self.batch_size, sampler=self.sampler,
                          num_workers=self.num_workers, drop_last=True, pin_memory=self.pin_memory,
                          persistent_workers=self.num_workers > 0)

    # A checkpoint written mid-epoch records how many samples of the epoch all ranks together consumed; on resume the
    # sampler skips them, so a killed run continues with exactly the batches the uninterrupted run would have seen,
    # also on another device count (the count is in samples, not in batches of one world size).
    def state_dict(self) -> dict:
        loop = self.trainer.fit_loop
        batches = loop.epoch_loop.batch_progress.current.processed
        return {"epoch": loop.epoch_progress.current.processed, "batches_done": batches,
                "samples_done": batches * self.batch_size * self.trainer.world_size}

    def load_state_dict(self, state: dict) -> None:
        consumed = state.get("samples_done", state["batches_done"] * self.batch_size * self.trainer.world_size)
        if 0 < consumed < len(self.train_set):
            self.sampler.resume_at(state["epoch"], consumed)


class ResumableDataLoader(DataLoader):
    """A DataLoader that tells Lightning it resumes mid-epoch. Lightning warns on every mid-epoch resume unless the
    loader itself has ``state_dict``/``load_state_dict``; here the position is restored by
    ``DataModule.load_state_dict`` (the sampler skips the consumed batches), so the loader has no state of its own."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
