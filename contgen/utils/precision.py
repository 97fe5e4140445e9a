"""Numeric precision of sampling (``module.sample_precision``; ``precision=`` in sample.py / evaluate.py).

The references sample under fp16 autocast (engine_mar.py:155-159, EAR engine_ear.py:167-171). contgen's default
is bf16 autocast on a GPU (the same speed, fp32's range) and fp32 on the CPU, where autocast only slows small
matmuls down; ``fp16`` reproduces the reference and ``fp32`` is the exact opt-in. Noise schedules, the energy
score's norms and the tokenizer's posterior stay fp32 inside the autocast region (each module says where).
"""

from __future__ import annotations

import contextlib

import torch

SAMPLE_PRECISIONS = ("auto", "bf16", "fp16", "fp32")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_sample_precision(precision: str, key: str = "module.sample_precision") -> str:
    if precision not in SAMPLE_PRECISIONS:
        raise ValueError(f"{key} must be one of {SAMPLE_PRECISIONS}, got {precision!r}")
    return precision


def resolve_sample_precision(precision: str, device: torch.device) -> str:
    """``auto`` → ``bf16`` on CUDA, ``fp32`` elsewhere."""
    if check_sample_precision(precision) == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def sampling_autocast(precision: str, device: torch.device):
    """The autocast region that sampling runs in (a no-op for fp32)."""
    precision = resolve_sample_precision(precision, device)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_DTYPES[precision])
