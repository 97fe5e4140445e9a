"""Config helpers: resolvers, compact printing, plain-container snapshots and instantiation of whole groups."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

OmegaConf.register_new_resolver("contgen.precision", lambda: "bf16-mixed" if torch.cuda.is_available() else "32-true",
                                replace=True)


def _sweep_group() -> str | None:
    """Inside a Hydra ``-m`` job: the sweep directory's name (what its points share), else None."""
    from contgen.cli.sweep import hydra_sweep_job

    job = hydra_sweep_job()
    return job[0].name if job is not None else None


OmegaConf.register_new_resolver("contgen.sweep_group", _sweep_group, replace=True)


def to_container(cfg: DictConfig) -> dict:
    """Resolved plain dict: what checkpoints store (loads with ``torch.load(weights_only=True)``)."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


def print_config(cfg: DictConfig, save_to: str | Path | None = None) -> list[str]:
    """Print a compact view of the config and save the full resolved one as YAML (``save_to``).

    The compact view names the chosen config groups and the command-line overrides (what makes this run differ
    from the defaults), one line each, never cut by a console width. Outside a Hydra run it falls back to one line
    per top-level key."""
    lines = compact_config(cfg, save_to)
    print("\n".join(lines), flush=True)
    if save_to is not None:
        Path(save_to).parent.mkdir(parents=True, exist_ok=True)
        Path(save_to).write_text(OmegaConf.to_yaml(cfg, resolve=True))
    return lines


def compact_config(cfg: DictConfig, save_to: str | Path | None = None) -> list[str]:
    head = f"config (full resolved config: {save_to})" if save_to is not None else "config"
    try:
        from hydra.core.hydra_config import HydraConfig

        hydra = HydraConfig.get()
    except ValueError:  # not inside a Hydra run (a test, a notebook)
        hydra = None
    if hydra is None:
        return [head, *(f"  {k}: {_one_line(v)}" for k, v in cfg.items())]
    choices = {k: v for k, v in reversed(hydra.runtime.choices.items()) if not k.startswith("hydra") and v is not None}
    overrides = list(hydra.overrides.task)
    return [head, "  groups: " + " ".join(f"{k}={v}" for k, v in choices.items()),
            "  overrides: " + (" ".join(overrides) if overrides else "none (the defaults)")]


def _one_line(value) -> str:
    if isinstance(value, DictConfig):
        return "{" + ", ".join(f"{k}: {_one_line(v)}" for k, v in value.items()) + "}"
    return str(OmegaConf.to_container(value, resolve=True)) if OmegaConf.is_list(value) else str(value)


def instantiate_group(group: DictConfig | dict | None) -> list[Any]:
    """Instantiate every entry of a name → config mapping (callbacks, loggers); ``null`` entries are skipped."""
    return [instantiate(c) for c in (group or {}).values() if c is not None]
