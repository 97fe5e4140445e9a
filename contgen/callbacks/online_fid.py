"""FID during training: every ``every_n_steps`` optimizer steps a small class-balanced set is sampled (shared over the
ranks, as evaluate.py samples) and scored like evaluate.py (FD_builtin on built-in data, Inception FID with
``metrics.inception_weights``); the scores go to every logger as ``online/<metric>`` at the training step."""

from __future__ import annotations

import lightning as L
from omegaconf import OmegaConf


class OnlineFID(L.Callback):
    def __init__(self, every_n_steps: int, num_samples: int, batch_size: int, seed: int, use_ema: bool):
        if every_n_steps < 0 or num_samples < 1 or batch_size < 1:
            raise ValueError(f"callbacks.online_fid: every_n_steps must be >= 0, num_samples and batch_size >= 1, got "
                             f"{every_n_steps}, {num_samples} and {batch_size}")
        self.every_n_steps, self.num_samples, self.batch_size = every_n_steps, num_samples, batch_size
        self.seed, self.use_ema = seed, use_ema
        self.last_step = -1  # under gradient accumulation several batches end on the same optimizer step

    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        if self.every_n_steps:
            from contgen.cli.evaluate import check_metrics, fid_metric

            cfg = self.metrics_config(pl_module)
            check_metrics(cfg.metrics)
            fid_metric(cfg)  # data and metrics that give no FID fail before training, not at the first evaluation
            if cfg.metrics.inception_weights and not cfg.metrics.ref_stats:
                raise ValueError("callbacks.online_fid with metrics.inception_weights needs metrics.ref_stats (an .npz "
                                 "of the data's Inception mu/sigma): the data set's statistics are not recomputed "
                                 "at every evaluation")

    def metrics_config(self, pl_module):
        """The run's own ``metrics`` (what to compute: built-in, Inception), ``data.train`` and ``paths`` (the
        classifier cache), from the config the module was built with, with this callback's sample set."""
        c = pl_module.config
        metrics = {**c["metrics"], "num_samples": self.num_samples, "batch_size": self.batch_size}
        return OmegaConf.create({"metrics": metrics, "data": {"train": c["data"]["train"]}, "paths": c["paths"]})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if not self.every_n_steps or step % self.every_n_steps or step == 0 or step == self.last_step:
            return
        from contgen.cli.evaluate import generate_balanced, score

        self.last_step = step
        images, labels = generate_balanced(pl_module, self.num_samples, self.batch_size, self.seed, self.use_ema)
        if images is None:  # not rank 0: its share is sampled and gathered
            return
        results = score(images, labels, self.metrics_config(pl_module), device=pl_module.device)
        numbers = {f"online/{k}": v for k, v in results.items() if isinstance(v, (int, float)) and k != "num_samples"}
        for logger in trainer.loggers:
            logger.log_metrics(numbers, step=step)
