"""Timing helpers shared by both sides of the bench: the same protocol for contgen and the reference."""

from __future__ import annotations

import os
import statistics
import subprocess
import time
from pathlib import Path

import torch
from torch.utils import flop_counter

ROOT = Path(__file__).resolve().parents[1]


def _count_cpu_attention() -> None:
    """torch's FLOP counter has formulas for the GPU's attention kernels only; on the CPU, attention would count 0.
    Registers the same formulas (4·s_q·s_k·d per head forward, 2.5 times that backward) for the CPU's kernels."""
    aten = torch.ops.aten
    formulas = {aten._scaled_dot_product_flash_attention_for_cpu:
                lambda q, k, v, *args, out_shape=None, **kw: flop_counter.sdpa_flop_count(q, k, v),
                aten._scaled_dot_product_flash_attention_for_cpu_backward:
                lambda g, q, k, v, *args, out_shape=None, **kw: flop_counter.sdpa_backward_flop_count(g, q, k, v)}
    for op, formula in formulas.items():
        if op not in flop_counter.flop_registry:
            flop_counter.register_flop_formula(op)(formula)


_count_cpu_attention()


class Timer:
    """Device synchronisation and peak memory for CUDA; no-ops on the CPU (smoke runs)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gib(self) -> float | None:
        return round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2) if self.cuda else None


# Dense bf16 peak (no sparsity) by GPU name, TFLOP/s: the denominator of MFU.
BF16_PEAK_TFLOPS = [("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("H800", 989.0), ("A100", 312.0),
                    ("L40S", 362.0), ("A10G", 70.0)]


def bf16_peak(name: str) -> float | None:
    return next((tflops for key, tflops in BF16_PEAK_TFLOPS if key in name), None)


def summarize(times: list[float], batch: int, unit: str) -> dict:
    """Mean and median of per-``unit`` wall times (each between two device synchronisations) and the
    throughput of the mean: img/s for training steps, s/img for sampling batches."""
    mean, median = sum(times) / len(times), statistics.median(times)
    out = {f"{unit}_s": round(mean, 4), f"median_{unit}_s": round(median, 4), "n": len(times)}
    if unit == "step":
        out["img_per_s"] = round(batch / mean, 1)
    else:
        out["s_per_img"] = round(mean / batch, 5)
    return out


def environment(device: torch.device) -> dict:
    """What a result line records of where it ran: the device, torch, the date, a run id, and contgen's commit with
    the files under contgen/ and conf/ that differ from it. A copy without git (the device machine) takes the commit
    from ``CONTGEN_COMMIT`` / ``CONTGEN_DIRTY``."""

    def git(*a):
        try:
            return subprocess.run(["git", "-C", str(ROOT), *a], capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    base = {"gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"), "run_id": os.environ.get("BENCH_RUN_ID") or time.strftime("%Y%m%dT%H%M%S")}
    if os.environ.get("CONTGEN_COMMIT") or git("rev-parse", "--git-dir") is None:  # a copy on another machine
        return {**base, "contgen_commit": os.environ.get("CONTGEN_COMMIT"),
                "contgen_dirty": os.environ.get("CONTGEN_DIRTY")}
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "contgen", "conf")
    return {**base, "contgen_commit": git("rev-parse", "--short", "HEAD"),
            "contgen_dirty": [line.split(maxsplit=1)[-1] for line in dirty.splitlines()] if dirty else dirty}
