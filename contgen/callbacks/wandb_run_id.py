"""Store the W&B run id in every checkpoint, so that a resumed training (``ckpt_path=last``, a requeued SLURM job)
continues the same W&B run: train.py's ``build_loggers`` reads it back (``wandb_run_id``) and passes it as
``logger.wandb.id`` with ``resume: allow``. Kept as the callback's state: a plain dict, loadable weights-only."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.loggers import WandbLogger


class WandbRunId(L.Callback):
    def __init__(self, logger: WandbLogger):
        self.logger = logger

    def state_dict(self) -> dict:
        return {"id": self.logger.version}  # the run's id once it has started (rank 0), else the configured one


def wandb_run_id(checkpoint: dict) -> str | None:
    return checkpoint.get("callbacks", {}).get(WandbRunId.__qualname__, {}).get("id")
