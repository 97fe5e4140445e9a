"""In a submitit SLURM job: take submitit's requeue signal at a step boundary, after ``last.ckpt`` is written.

submitit's handler (SIGUSR2 unless ``SUBMITIT_PREEMPT_SIGNAL`` says otherwise) re-pickles the job, runs
``scontrol requeue`` and exits at once, wherever the signal lands — mid optimizer step, with nothing saved. During
``fit`` this callback holds the signal: its handler only notes it; at the end of the step all ranks agree, write
``last.ckpt`` (the file the requeued job resumes, contgen/cli/slurm.py) and then run submitit's handler unchanged.
Outside ``fit`` submitit's handler is in place: a signal there requeues the job as it is (the finished fit is not
repeated; the evaluation is).
"""

from __future__ import annotations

import signal

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


class RequeueCheckpoint(L.Callback):
    def __init__(self):
        from submitit.slurm.slurm import SlurmJobEnvironment

        self.signum = SlurmJobEnvironment._usr_sig()
        self._submitit_handler = None
        self._pending = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._checkpoint = next((c for c in trainer.checkpoint_callbacks
                                 if isinstance(c, ModelCheckpoint) and c.save_last), None)
        if self._checkpoint is None:
            raise ValueError("cluster=slurm: a requeued job resumes from last.ckpt, but no checkpoint callback saves "
                             "it; set callbacks.checkpoint.save_last=true")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._submitit_handler = signal.getsignal(self.signum)
        if not callable(self._submitit_handler):
            raise RuntimeError(f"RequeueCheckpoint: no submitit handler for {signal.Signals(self.signum).name}; "
                               "it runs inside a job submitted by submitit (python train.py -m cluster=slurm ...)")
        self._pending = False
        signal.signal(self.signum, self._note)

    def _note(self, signum, frame) -> None:
        self._pending = True  # nothing else here: a print could land inside another print (reentrant call)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        # every rank got the signal, maybe in different steps: all save together, in the step the first one saw it
        if trainer.strategy.reduce_boolean_decision(self._pending, all=False):
            self._pending = True
            self._checkpoint._save_last_checkpoint(trainer, self._checkpoint._monitor_candidates(trainer))
            print(f"{signal.Signals(self.signum).name}: saved {self._checkpoint.last_model_path} at step "
                  f"{trainer.global_step}; submitit requeues the job")
            self._release()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._release()  # a signal after the last step: FinalCheckpoint (first in the list) has saved last.ckpt

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if self._submitit_handler is not None:
            signal.signal(self.signum, self._submitit_handler)

    def _release(self) -> None:
        """Give the signal back to submitit; a noted one is delivered now (rank 0: requeue and exit)."""
        if self._submitit_handler is None:
            return
        handler, self._submitit_handler = self._submitit_handler, None
        signal.signal(self.signum, handler)
        if self._pending:
            self._pending = False
            handler(self.signum, None)
