"""Sample grids during training: fixed classes and seed, EMA weights, PNG in the run directory and W&B."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.strategies import FSDPStrategy

from contgen.utils.images import save_grid


class SampleGrid(L.Callback):
    def __init__(self, every_n_steps: int = 1000, classes: list[int] | None = None, per_class: int = 4, seed: int = 0,
                 out_dir: str = "samples", use_ema: bool = True, at_end: bool = True):
        self.every_n_steps, self.classes, self.per_class = every_n_steps, classes, per_class
        self.seed, self.out_dir, self.use_ema, self.at_end = seed, out_dir, use_ema, at_end
        if every_n_steps < 0 or per_class < 1:
            raise ValueError(f"callbacks.sample_grid: every_n_steps must be >= 0 and per_class >= 1, got "
                             f"{every_n_steps} and {per_class}")

    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        self.labels(pl_module.num_classes, "cpu")  # bad classes fail before training, not after it

    def labels(self, num_classes: int, device) -> torch.Tensor:
        classes = self.classes if self.classes is not None else list(range(min(num_classes, 16)))
        bad = [c for c in classes if not 0 <= c < num_classes]
        if bad:
            raise ValueError(f"callbacks.sample_grid.classes: {bad} outside [0, {num_classes})")
        return torch.tensor(classes, device=device).repeat_interleave(self.per_class)

    def write(self, trainer: L.Trainer, pl_module) -> Path | None:
        # rank 0 samples alone, except a sharded model (FSDP), whose layers every rank gathers together
        if trainer.global_rank != 0 and not isinstance(trainer.strategy, FSDPStrategy):
            return None
        labels = self.labels(pl_module.num_classes, pl_module.device)
        g = torch.Generator(pl_module.device).manual_seed(self.seed)
        images = pl_module.generate(labels, generator=g, use_ema=self.use_ema)
        if trainer.global_rank != 0:
            return None
        path = Path(trainer.default_root_dir) / self.out_dir / f"step_{trainer.global_step:07d}.png"
        save_grid(images, path, nrow=self.per_class)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image("samples", [str(path)], step=trainer.global_step,
                                 caption=[f"classes {labels[::self.per_class].tolist()}, rows = class"])
        return path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0 and trainer.global_step > 0:
            self.write(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.at_end:
            self.write(trainer, pl_module)
