"""Import the released checkpoints of the reference MAR (LTH14/mar) and EAR (shaochenze/EAR) code.

Their ``.pth`` files are dicts with ``model`` and ``model_ema`` state dicts (plus, in training
checkpoints, ``optimizer``, ``epoch``, ``scaler`` and a pickled ``argparse.Namespace`` under ``args``;
MAR util/misc.py:306-329). Backbone keys use the reference names, which contgen's backbones keep; the
head's keys carry the prefix ``diffloss.`` (MAR) or ``scoreloss.`` (EAR). Files are read with
``torch.load(weights_only=True)``; unpickling arbitrary objects can run code, so it needs an explicit
opt-in for trusted files.
"""

from __future__ import annotations

import os
import pickle

import torch
from torch import nn

HEAD_PREFIXES = ("diffloss.", "scoreloss.")


def read_released(path: str, allow_pickle: bool, what: str = "ckpt") -> dict:
    """``torch.load`` of a released reference file on the CPU, tensors only unless ``allow_pickle`` (for trusted
    files: the references' training checkpoints pickle an argparse Namespace); errors start with ``what``."""
    if not os.path.isfile(path):
        raise ValueError(f"{what}: file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{what}: {path} holds pickled Python objects besides tensors (e.g. the reference's argparse "
            "Namespace under 'args'), which torch.load(weights_only=True) refuses. Unpickling can run arbitrary "
            "code: only for a file you trust, pass allow_pickle=True (allow_pickle=true on the command line)."
        ) from e


def _check(name: str, path: str, module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Strict key and shape check, listing every problem at once."""
    own = module.state_dict()
    missing = sorted(own.keys() - state.keys())
    unexpected = sorted(state.keys() - own.keys())
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(own.keys() & state.keys()) if state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        lines = [f"ckpt: {path} does not match the {name}:"]
        for what, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
            if items:
                lines.append(f"  {what} ({len(items)}): " + ", ".join(items))
        raise ValueError("\n".join(lines))


def load_reference_mar(path: str, backbone: nn.Module, head: nn.Module, use_ema: bool = True,
                       allow_pickle: bool = False) -> None:
    """Load a reference MAR/EAR checkpoint into ``backbone`` and ``head`` in place.

    ``use_ema`` picks ``model_ema`` (the weights the reference evaluates) over ``model``. Head keys
    are those under ``diffloss.`` or ``scoreloss.``, with the prefix removed; everything else belongs
    to the backbone. Both must match exactly (names and shapes), or a ValueError lists the differences.
    """
    ckpt = read_released(path, allow_pickle)
    key = "model_ema" if use_ema else "model"
    if not isinstance(ckpt, dict) or key not in ckpt:
        found = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        hint = " (the file has no EMA weights: set use_ema=false to load 'model')" if use_ema else ""
        raise ValueError(f"ckpt: {path} has no '{key}' entry{hint}; found {found}")
    state = ckpt[key]
    prefix = next((p for p in HEAD_PREFIXES if any(k.startswith(p) for k in state)), HEAD_PREFIXES[0])
    head_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    backbone_state = {k: v for k, v in state.items() if not k.startswith(prefix)}
    _check("backbone", path, backbone, backbone_state)
    _check(f"head (keys '{prefix}*')", path, head, head_state)
    backbone.load_state_dict(backbone_state)
    head.load_state_dict(head_state)


def reference_num_classes(path: str, allow_pickle: bool = False) -> int:
    """Class count of a reference MAR/EAR ``.pth``: the rows of its ``class_emb.weight`` (mar.py:59, ear.py:60).

    The file is memory-mapped where its format allows, so only the shape is read, not gigabytes of weights."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=not allow_pickle, mmap=True)
    except (RuntimeError, OSError, pickle.UnpicklingError):  # legacy (non-zip) format, missing file or pickled objects: _read gives the clear error
        ckpt = read_released(path, allow_pickle)
    states = [ckpt[k] for k in ("model_ema", "model") if isinstance(ckpt, dict) and isinstance(ckpt.get(k), dict)]
    weight = next((s["class_emb.weight"] for s in states if "class_emb.weight" in s), None)
    if weight is None or weight.ndim != 2:
        found = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"ckpt: {path} has no 'class_emb.weight' (the class embedding of a MAR/EAR backbone) under "
                         f"'model' or 'model_ema', so its class count cannot be read (top-level entries: {found}); "
                         "reference=<experiment> expects a released MAR/EAR .pth")
    return int(weight.shape[0])
