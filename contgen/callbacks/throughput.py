"""Images per second, measured on the host between log intervals (no device sync of its own)."""

from __future__ import annotations

import time

import lightning as L


class Throughput(L.Callback):
    def __init__(self):
        self._t0, self._step0 = None, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        every = max(1, trainer.log_every_n_steps)
        if trainer.global_step % every:
            return
        now = time.perf_counter()
        if self._t0 is not None and trainer.global_step > self._step0:
            batch_size = next(iter(batch.values())).shape[0] * trainer.world_size * trainer.accumulate_grad_batches
            rate = (trainer.global_step - self._step0) * batch_size / (now - self._t0)
            pl_module.log("train/img_per_s", rate)
        self._t0, self._step0 = now, trainer.global_step
