"""Rebuild a trained module from a checkpoint written by train.py (config and weights both come from it)."""

from __future__ import annotations

from pathlib import Path

import torch
from hydra.utils import get_class
from omegaconf import OmegaConf

from contgen.cli.build import build_module
from contgen.cli.checkpoint_io import load_checkpoint
from contgen.modules.base import GenerativeModule


def pick_device(device: str) -> torch.device:
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)


def load_module(ckpt_path: str, device: str = "auto", overrides: dict | None = None, reference: str | None = None,
                allow_pickle: bool = False) -> tuple[GenerativeModule, dict]:
    """``overrides``: dotted keys merged into the stored config (``sampler.cfg``, ``tokenizer.ckpt_path``, ...);
    ``None`` values keep the stored value; ``module.compile_mode`` (how the trained net compiles for training) is
    reset to ``default``. ``reference``: the name of a paper experiment (``mar_base_in256``)
    whose architecture a released reference ``.pth`` (``model`` / ``model_ema`` state dicts) is read into."""
    if reference is not None:
        return load_reference(ckpt_path, reference, device, overrides, allow_pickle)
    ckpt = load_checkpoint(ckpt_path)
    if "contgen" not in ckpt:
        raise ValueError(f"ckpt: {ckpt_path} was not written by contgen's train.py (no 'contgen' entry); for a "
                         "released reference checkpoint pass reference=<experiment>, e.g. reference=mar_base_in256")
    cfg = OmegaConf.create(ckpt["contgen"]["config"])
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        group, _, name = key.partition(".")
        if group == "sampler" and name not in cfg.sampler:  # the families' samplers have different settings
            raise ValueError(f"sampler.{name}={value}: not a setting of this checkpoint's sampler "
                             f"({cfg.sampler._target_}); its settings: {sorted(k for k in cfg.sampler if k != '_target_')}")
        OmegaConf.update(cfg, key, value, merge=True)
    if "compile_mode" in cfg.module:  # the trained net's training-time CUDA graphs: a loaded module only samples
        cfg.module.compile_mode = "default"
    module = build_module(cfg, ckpt["contgen"]["num_classes"])
    module.on_load_checkpoint(ckpt)
    module.load_state_dict(ckpt["state_dict"], strict=True)
    return module.to(pick_device(device)).eval(), OmegaConf.to_container(cfg)


def load_reference(path: str, experiment: str, device: str = "auto", overrides: dict | None = None,
                   allow_pickle: bool = False) -> tuple[GenerativeModule, dict]:
    """A released reference checkpoint (MAR/EAR ``.pth``; UCGM/REPA/DiT denoiser ``.pt``): the architecture comes from
    ``experiment=<name>``, the class count from the file's class embedding, the raw weights go to the module and
    the EMA weights to its EMA copy (what sampling uses by default) — each family reads its own layouts
    (``released_num_classes`` / ``load_released``)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    dotted = [f"experiment={experiment}", "paths.output_dir=.", "data.root=null"]  # no data needed to sample
    dotted += [f"{k}={v}" for k, v in (overrides or {}).items() if v is not None]
    if GlobalHydra.instance().is_initialized():  # inside sample.py / evaluate.py: same config search path
        cfg = compose("train.yaml", overrides=dotted)
    else:
        with initialize_config_dir(str(Path(__file__).resolve().parents[2] / "conf"), version_base="1.3"):
            cfg = compose("train.yaml", overrides=dotted)
    cls = get_class(cfg.module._target_)
    module = build_module(cfg, cls.released_num_classes(path, allow_pickle))
    module.load_released(path, allow_pickle)
    return module.to(pick_device(device)).eval(), OmegaConf.to_container(cfg, resolve=True)
