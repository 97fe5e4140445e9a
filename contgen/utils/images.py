"""Image conversions and writers shared by sampling, evaluation and callbacks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.utils import make_grid


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float NCHW → uint8 NCHW via round((x + 1) · 127.5), the convention used for every export."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def save_grid(images: torch.Tensor, path: str | Path, nrow: int = 8) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = make_grid(to_uint8(images).cpu(), nrow=nrow, padding=2)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)
    return path


def save_npz(images: torch.Tensor, labels: torch.Tensor, path: str | Path) -> Path:
    """ADM-style sample batch: ``arr_0`` uint8 NHWC (the evaluator suite's format) and ``labels``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, arr_0=to_uint8(images).permute(0, 2, 3, 1).cpu().numpy(), labels=labels.cpu().numpy())
    return path
