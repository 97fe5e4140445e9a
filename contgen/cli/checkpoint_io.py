"""Atomic checkpoint writes and weights-only checkpoint reads."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to ``<path>.tmp`` then ``os.replace``: a write killed midway never destroys the previous file."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(checkpoint, tmp)
        os.replace(tmp, path)

    def load_checkpoint(self, path, map_location=None, weights_only: bool | None = None) -> dict[str, Any]:
        return load_checkpoint(path, map_location)


def load_checkpoint(path, map_location="cpu", mmap: bool = False) -> dict[str, Any]:
    """``torch.load(weights_only=True)``: contgen checkpoints hold tensors and plain containers only. ``mmap`` maps
    the tensors instead of reading them (to look at the stored config of a large file)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path} (set ckpt / ckpt_path to a .ckpt written by train.py)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except (EOFError, RuntimeError, KeyError, ValueError, pickle.UnpicklingError) as e:
        raise ValueError(f"not a checkpoint: {path} ({type(e).__name__}: {e}); it may be empty or truncated") from e
    if not isinstance(ckpt, dict):
        raise ValueError(f"not a checkpoint: {path} (holds a {type(ckpt).__name__}, not a dict)")
    return ckpt


def resolve_ckpt_path(ckpt_path: str | None, output_dir: str) -> str | None:
    """``last`` → ``<output_dir>/checkpoints/last.ckpt``. Where it does not exist yet, a run that was started there
    before (its ``config.yaml`` is there) was killed before its first checkpoint and starts from scratch; a directory
    with no run in it is an error (a mistyped ``hydra.run.dir`` must not silently train from scratch)."""
    if ckpt_path in (None, ""):
        return None
    if ckpt_path == "last":
        last = Path(output_dir) / "checkpoints" / "last.ckpt"
        if last.is_file():
            return str(last)
        if (Path(output_dir) / "config.yaml").is_file():
            print(f"ckpt_path=last: {output_dir} has no checkpoint yet (killed before the first save); starting from scratch")
            return None
        raise FileNotFoundError(f"ckpt_path=last: no run to resume in {output_dir} (no {last}, no config.yaml); "
                                "check hydra.run.dir")
    if not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"ckpt_path: no checkpoint at {ckpt_path}")
    return ckpt_path
