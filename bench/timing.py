"""Timing helpers shared by both sides of the bench: the same protocol for contgen and the reference."""

from __future__ import annotations

import statistics

import torch


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
