import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


def run_script(script: str, *overrides: str, cwd: Path = ROOT, timeout: int = 900, env: dict | None = None):
    """Run one of the entry points in a subprocess like a user would; fail with its output on error."""
    proc = subprocess.run([sys.executable, str(ROOT / script), *overrides], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(overrides)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture
def cache_dir(tmp_path_factory):
    """Built-in classifier cache shared by the whole session (trained once)."""
    return os.environ.get("CONTGEN_CACHE") or str(tmp_path_factory.getbasetemp() / "contgen-cache")
