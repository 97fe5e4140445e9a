"""Test helpers: run an entry point like a user; a callback that kills training (used from the command line
with `+callbacks.kill._target_=tests.helpers.KillAtStep`)."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import yaml

ROOT = Path(__file__).resolve().parents[1]


def train_optim(**overrides) -> dict:
    """conf/train.yaml's ``optim`` block (the one place its defaults live), with ``overrides``."""
    return {**yaml.safe_load((ROOT / "conf" / "train.yaml").read_text())["optim"], **overrides}


def run_script(script: str, *overrides: str, cwd: Path = ROOT, timeout: int = 900, env: dict | None = None):
    """Run one of the entry points in a subprocess like a user would; fail with its output on error."""
    proc = subprocess.run([sys.executable, str(ROOT / script), *overrides], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(overrides)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


# train.py overrides for a 4-step tiny MAR run with a small head (the per-token head end-to-end tests)
TINY_MAR_HEAD_RUN = ["debug=limit", "data.image_size=16", "data.train.num_samples=64", "data.batch_size=16",
                     "data.num_workers=0", "model.encoder_embed_dim=32", "model.decoder_embed_dim=32",
                     "model.encoder_depth=1", "model.decoder_depth=1", "model.encoder_num_heads=2",
                     "model.decoder_num_heads=2", "loss.width=32", "loss.depth=1"]


class KillAtStep(L.Callback):
    """SIGKILL the training process when ``step`` optimizer steps are done — a real, unclean kill."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class RecordShortcutLevels(L.Callback):
    """Write each rank's Shortcut level layout and world size (``objective.layout``) to ``<dir>/rank<r>.json`` at the
    first training batch: what the process group actually gives the objective."""

    def __init__(self, dir: str):
        self.dir = dir

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            import json

            rows, levels = pl_module.objective.layout(len(batch["label"]))
            with open(os.path.join(self.dir, f"rank{trainer.global_rank}.json"), "w") as f:
                json.dump({"world_size": trainer.world_size, "rows": rows, "levels": levels}, f)


class RecordBatches(L.Callback):
    """Append each rank's samples of every training step (an md5 of each image) to ``<dir>/rank<r>.jsonl``, one line
    per step, flushed at once (it survives a SIGKILL): which samples each optimizer step saw."""

    def __init__(self, dir: str):
        self.dir = dir

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        import hashlib
        import json

        digests = [hashlib.md5(x.cpu().numpy().tobytes()).hexdigest()[:12] for x in batch["image"]]
        with open(Path(self.dir) / f"rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps({"step": trainer.global_step, "samples": digests}) + "\n")


class SlowSteps(L.Callback):
    """Sleep ``seconds`` after every training step: a tiny run that lasts long enough to be signalled mid-training."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        import time

        time.sleep(self.seconds)
