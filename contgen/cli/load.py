"""Rebuild a trained module from a checkpoint written by train.py (config and weights both come from it)."""

from __future__ import annotations

import torch
from omegaconf import OmegaConf

from contgen.cli.build import build_module
from contgen.cli.checkpoint_io import load_checkpoint
from contgen.modules.token_ar import TokenARModule


def pick_device(device: str) -> torch.device:
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)


def load_module(ckpt_path: str, device: str = "auto", overrides: dict | None = None) -> tuple[TokenARModule, dict]:
    """``overrides``: dotted keys merged into the stored config (``sampler.cfg``, ``tokenizer.ckpt_path``, ...);
    ``None`` values keep the stored value."""
    ckpt = load_checkpoint(ckpt_path)
    if "contgen" not in ckpt:
        raise ValueError(f"ckpt: {ckpt_path} was not written by contgen's train.py (no 'contgen' entry); "
                         "released MAR .pth files load through contgen.utils.reference_ckpt")
    cfg = OmegaConf.create(ckpt["contgen"]["config"])
    for key, value in (overrides or {}).items():
        if value is not None:
            OmegaConf.update(cfg, key, value, merge=True)
    module = build_module(cfg, ckpt["contgen"]["num_classes"])
    module.on_load_checkpoint(ckpt)
    module.load_state_dict(ckpt["state_dict"], strict=True)
    return module.to(pick_device(device)).eval(), OmegaConf.to_container(cfg)
