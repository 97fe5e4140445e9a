"""Save ``last.ckpt`` when training ends, so it is always the model that was trained (and then scored).

``ModelCheckpoint`` saves every ``every_n_train_steps`` and at epoch ends; a run whose length is not a multiple of
the interval would otherwise end with a ``last.ckpt`` that misses the final steps, while ``metrics.json`` scores
them. train.py puts this callback first, so it runs before anything else at the end of training can fail.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


class FinalCheckpoint(L.Callback):
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        callback = next((c for c in trainer.callbacks if isinstance(c, ModelCheckpoint) and c.save_last), None)
        # Lightning's own on_train_end saves `last` only if none was ever saved; its bookkeeping (file name, the
        # step last saved) is reused so that the file is the usual last.ckpt and resume finds it.
        if callback is not None and callback._last_global_step_saved != trainer.global_step:
            callback._save_last_checkpoint(trainer, callback._monitor_candidates(trainer))
