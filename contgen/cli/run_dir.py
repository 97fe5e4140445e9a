"""One run per run directory: what ``train.py`` writes there always belongs to one training.

Rule: a training starts in an empty run directory, or resumes the run that is there (``ckpt_path=last`` or a
checkpoint path). Re-running into a used directory without resuming is refused before compute (checkpoints of two
runs would mix: Lightning writes ``last-v1.ckpt`` beside the old ``last.ckpt``), and so is a second training in a
directory whose lock is held by a live process. Hydra's own files (``.hydra/``, ``<job>.log``) do not count.
"""

from __future__ import annotations

import atexit
import os
from pathlib import Path

LOCK = ".contgen.lock"


def global_rank() -> int:
    """The launcher's rank before Lightning is up (Lightning's DDP children and SLURM tasks set these)."""
    for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if key in os.environ:
            return int(os.environ[key])
    return 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _lock(run_dir: Path) -> None:
    path = run_dir / LOCK
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(path.read_text().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and pid != os.getpid() and _alive(pid):
                raise RuntimeError(f"run directory {run_dir} is in use by another training (pid {pid}, {path}); "
                                   "start this one in another hydra.run.dir") from None
            path.unlink(missing_ok=True)  # left by a killed run
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        atexit.register(lambda: path.unlink(missing_ok=True))
        return
    raise RuntimeError(f"could not take the lock {path}")


def claim_run_dir(run_dir: str | Path, resuming: bool) -> None:
    """Lock ``run_dir`` for this training (rank 0 only), refuse a used one unless ``resuming``, and remove the
    temporary file of a checkpoint write that was killed midway."""
    run_dir = Path(run_dir)
    if global_rank() != 0:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    _lock(run_dir)
    hydra_files = {".hydra", LOCK, "train.log"}
    used = sorted(p.name for p in run_dir.iterdir() if p.name not in hydra_files)
    if used and not resuming:
        raise RuntimeError(f"run directory {run_dir} already holds a run ({', '.join(used)}): resume it with "
                           "ckpt_path=last, or start a new run in another hydra.run.dir (the default is a fresh "
                           "timestamped directory)")
    for tmp in (run_dir / "checkpoints").glob("*.tmp"):
        print(f"removing {tmp}: a checkpoint write that was killed midway (the previous checkpoint is intact)")
        tmp.unlink()
