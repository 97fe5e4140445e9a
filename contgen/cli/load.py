"""Rebuild a trained module from a checkpoint written by train.py (config and weights both come from it)."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from omegaconf import OmegaConf

from contgen.cli.build import build_module
from contgen.cli.checkpoint_io import load_checkpoint
from contgen.modules.base import GenerativeModule


def pick_device(device: str) -> torch.device:
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)


def load_module(ckpt_path: str, device: str = "auto", overrides: dict | None = None, reference: str | None = None,
                allow_pickle: bool = False) -> tuple[GenerativeModule, dict]:
    """``overrides``: dotted keys merged into the stored config (``sampler.cfg``, ``tokenizer.ckpt_path``, ...);
    ``None`` values keep the stored value. ``reference``: the name of a paper experiment (``mar_base_in256``)
    whose architecture a released reference ``.pth`` (``model`` / ``model_ema`` state dicts) is read into."""
    if reference is not None:
        return load_reference(ckpt_path, reference, device, overrides, allow_pickle)
    ckpt = load_checkpoint(ckpt_path)
    if "contgen" not in ckpt:
        raise ValueError(f"ckpt: {ckpt_path} was not written by contgen's train.py (no 'contgen' entry); for a "
                         "released reference checkpoint pass reference=<experiment>, e.g. reference=mar_base_in256")
    cfg = OmegaConf.create(ckpt["contgen"]["config"])
    for key, value in (overrides or {}).items():
        if value is not None:
            OmegaConf.update(cfg, key, value, merge=True)
    module = build_module(cfg, ckpt["contgen"]["num_classes"])
    module.on_load_checkpoint(ckpt)
    module.load_state_dict(ckpt["state_dict"], strict=True)
    return module.to(pick_device(device)).eval(), OmegaConf.to_container(cfg)


def reference_num_classes(path: str, allow_pickle: bool = False) -> int:
    """Class count of a reference MAR/EAR ``.pth``: the rows of its ``class_emb.weight`` (mar.py:59, ear.py:60).

    The file is memory-mapped where its format allows, so only the shape is read, not gigabytes of weights."""
    from contgen.utils.reference_ckpt import _read

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=not allow_pickle, mmap=True)
    except (RuntimeError, OSError, pickle.UnpicklingError):  # legacy (non-zip) format, missing file or pickled objects: _read gives the clear error
        ckpt = _read(path, allow_pickle)
    states = [ckpt[k] for k in ("model_ema", "model") if isinstance(ckpt, dict) and isinstance(ckpt.get(k), dict)]
    weight = next((s["class_emb.weight"] for s in states if "class_emb.weight" in s), None)
    if weight is None or weight.ndim != 2:
        found = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"ckpt: {path} has no 'class_emb.weight' (the class embedding of a MAR/EAR backbone) under "
                         f"'model' or 'model_ema', so its class count cannot be read (top-level entries: {found}); "
                         "reference=<experiment> expects a released MAR/EAR .pth")
    return int(weight.shape[0])


def load_reference(path: str, experiment: str, device: str = "auto", overrides: dict | None = None,
                   allow_pickle: bool = False) -> tuple[GenerativeModule, dict]:
    """A released MAR/EAR ``.pth`` (MAR ``diffloss.*`` or EAR ``scoreloss.*`` head keys): the architecture comes from
    ``experiment=<name>``, the class count from the file's class embedding, the raw weights go to the module and
    ``model_ema`` to its EMA copy (what sampling uses by default)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from contgen.utils.reference_ckpt import load_reference_mar

    dotted = [f"experiment={experiment}", "paths.output_dir=.", "data.root=null"]  # no data needed to sample
    dotted += [f"{k}={v}" for k, v in (overrides or {}).items() if v is not None]
    if GlobalHydra.instance().is_initialized():  # inside sample.py / evaluate.py: same config search path
        cfg = compose("train.yaml", overrides=dotted)
    else:
        with initialize_config_dir(str(Path(__file__).resolve().parents[2] / "conf"), version_base="1.3"):
            cfg = compose("train.yaml", overrides=dotted)
    module = build_module(cfg, reference_num_classes(path, allow_pickle))
    load_reference_mar(path, module.net.backbone, module.net.head, use_ema=False, allow_pickle=allow_pickle)
    load_reference_mar(path, module.ema.shadow.backbone, module.ema.shadow.head, use_ema=True, allow_pickle=allow_pickle)
    return module.to(pick_device(device)).eval(), OmegaConf.to_container(cfg, resolve=True)
