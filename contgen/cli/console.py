"""What the entry points print: each log line once, no known-harmless noise, progress on long steps, and CPU
thread counts that suit the machine. ``setup(threads, device)`` is called first by train.py, sample.py, evaluate.py and
cache_tokens.py."""

from __future__ import annotations

import logging
import os
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Iterable, Iterator, TypeVar

import torch

T = TypeVar("T")


def setup(threads="auto", accelerator: str | None = None) -> int:
    """Console and threads for one entry point; returns the torch thread count chosen."""
    quiet_logging()
    filter_warnings()
    return setup_threads(threads, accelerator)


# --- each line once -------------------------------------------------------------------------------------------------

def quiet_logging() -> None:
    """Lightning's package logger ``lightning`` has its own console handler ("INFO: ...") and also propagates to the
    root logger, where Hydra's handlers print the same record again (console and <job>.log). Once the root logger
    has handlers (Hydra configured logging), Lightning's own are dropped so that each line is printed once and
    still reaches the log file. Without root handlers (a plain script) nothing changes."""
    if not logging.getLogger().handlers:
        return
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        lg = logging.getLogger(name)
        for h in list(lg.handlers):
            if type(h) is logging.StreamHandler:  # Lightning's own console handlers (never a FileHandler)
                lg.removeHandler(h)
        lg.propagate = True
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropMessages) for f in rank_zero.filters):
        rank_zero.addFilter(_DropMessages(
            # an advertisement printed by every Trainer that has no LitLogger; says nothing about this run
            r"💡 Tip: For seamless cloud logging",
            # an internal step of Trainer.fit, printed on every run
            r"Loading `train_dataloader` to estimate number of stepping batches",
        ))


class _DropMessages(logging.Filter):
    def __init__(self, *patterns: str):
        super().__init__()
        self.patterns = [re.compile(p) for p in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(p.match(message) for p in self.patterns)


# --- known-harmless warnings, each matched by its own text ------------------------------------------------------------

HARMLESS_WARNINGS = (
    # The EMA copy (ema.shadow) and the frozen tokenizer are in eval mode on purpose; train.py checks the trained
    # modules itself (check_train_mode) and names any that are in eval mode.
    r"Found \d+ module\(s\) in eval mode at the start of training",
    # Lightning 2.6 against torch >= 2.10 (its own pytree helper); nothing a user can change.
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
)


def filter_warnings() -> None:
    for pattern in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


def check_train_mode(module: torch.nn.Module, frozen: tuple[str, ...] = ("ema", "tokenizer")) -> list[str]:
    """Submodules that train but are in eval mode (dropout off, ...), outside the ``frozen`` ones that are in eval
    mode on purpose; warned about by name (Lightning's own warning counts the frozen ones too, so it is filtered)."""
    bad = [name for name, m in module.named_modules()
           if name and not m.training and name.split(".")[0] not in frozen]
    if bad:
        warnings.warn(f"{len(bad)} trained module(s) are in eval mode at the start of training: "
                      f"{', '.join(bad[:8])}{' ...' if len(bad) > 8 else ''}")
    return bad


def quiet_wandb_logger(logger) -> None:
    """Lightning's WandbLogger always passes ``anonymous=None`` to ``wandb.init``, and wandb warns that the
    (deprecated) setting has no effect whenever it is passed at all. Dropping the unset key is what wandb asks for;
    an ``anonymous`` that was actually set is kept (and warned about by wandb)."""
    init = getattr(logger, "_wandb_init", None)
    if isinstance(init, dict) and init.get("anonymous") is None:
        init.pop("anonymous", None)


# --- CPU threads ------------------------------------------------------------------------------------------------------

def available_cores() -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup v2 CPU quota (containers)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        cores = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cores = min(cores, max(1, int(int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def busy_cores(window_s: float = 0.25) -> float:
    """Cores kept busy by other processes right now: the machine's CPU time in /proc/stat over ``window_s`` while
    this process sleeps. The 1-minute load average is no substitute: it lags, so right after another run ended it
    still reads ~1 on an idle machine and would halve the threads of a quiet run. Falls back to it without /proc."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return sum(values), values[3] + (values[4] if len(values) > 4 else 0)  # total, idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(window_s)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if total1 <= total0:
        return 0.0
    return (1 - (idle1 - idle0) / (total1 - total0)) * (os.cpu_count() or 1)


def auto_threads(cores: int, load: float) -> int:
    """Threads for a CPU run: the cores not already busy with other processes (``load``, from :func:`busy_cores`),
    at least one.
    Torch's threads wait for each other at every operation; when another process holds one of them, every step
    waits for the scheduler, which made a 2-core run 16 times slower than on a quiet machine (measured here at load
    ~8 on 2 cores: 12 default steps took 56-131 s with 2 threads, 11-13 s with 1).

    Reproducibility: with one thread two fresh CPU runs are bit-identical. With more, MKL's multi-threaded SGEMM is
    not run-to-run reproducible (the default differs from step ~7 in the 7th digit; MKL_NUM_THREADS=1 or
    MKL_CBWR=COMPATIBLE,STRICT made two 2-thread runs identical, MKL_CBWR=AUTO did not). The tiny sizes of the
    resume tests never split a GEMM across threads, which is why those are bit-exact at any thread count."""
    return max(1, min(cores, cores - int(round(load))))


def setup_threads(threads="auto", accelerator: str | None = None) -> int:
    """``threads``: an int, or ``auto``. With ``auto`` a GPU run keeps torch's default (the CPU only feeds the
    GPU); a CPU run uses :func:`auto_threads`. One inter-op thread: the models here run one op at a time."""
    uses_cuda = str(accelerator).startswith(("gpu", "cuda")) or (accelerator in (None, "auto") and torch.cuda.is_available())
    if threads in (None, "auto"):
        if uses_cuda:
            return torch.get_num_threads()
        cores = available_cores()
        load = busy_cores()
        n = auto_threads(cores, load)
        why = f"{cores} core(s) available, {load:.1f} busy with other processes"
        if n < cores:
            why += ": other processes are using cores"
        print(f"threads: {n} ({why}; set threads=N to choose)")
    else:
        n = int(threads)
        if n < 1:
            raise ValueError(f"threads must be 'auto' or >= 1, got {threads!r}")
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # only settable before the first inter-op work (a second job of a multirun)
        pass
    return n


# --- progress on long steps -------------------------------------------------------------------------------------------

def progress(items: Iterable[T], description: str, total: int | None = None, every_s: float = 30.0) -> Iterator[T]:
    """Iterate ``items`` with progress: a rich bar on a terminal; in a log (not a TTY) one line at the start, one
    every ``every_s`` seconds and one at the end, so a long step is never silent and a log stays short."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)
    if sys.stdout.isatty():
        from rich.progress import track

        yield from track(items, description=description, total=total)
        return
    of = f"/{total}" if total is not None else ""
    t0 = last = time.perf_counter()
    print(f"{description}: 0{of}", flush=True)
    done = 0
    for item in items:
        yield item
        done += 1
        now = time.perf_counter()
        if now - last >= every_s:
            print(f"{description}: {done}{of} ({now - t0:.0f} s)", flush=True)
            last = now
    print(f"{description}: {done}{of} done in {time.perf_counter() - t0:.1f} s", flush=True)
