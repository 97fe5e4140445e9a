"""Config helpers: resolvers, rich printing, plain-container snapshots and instantiation of whole groups."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

OmegaConf.register_new_resolver("contgen.precision", lambda: "bf16-mixed" if torch.cuda.is_available() else "32-true",
                                replace=True)


def to_container(cfg: DictConfig) -> dict:
    """Resolved plain dict: what checkpoints store (loads with ``torch.load(weights_only=True)``)."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


def print_config(cfg: DictConfig, save_to: str | Path | None = None) -> None:
    """Rich tree of the resolved config, one branch per top-level group; also saved as YAML."""
    import rich
    import rich.syntax
    import rich.tree

    tree = rich.tree.Tree("config", guide_style="dim")
    for key, value in cfg.items():
        text = OmegaConf.to_yaml(value, resolve=True) if isinstance(value, DictConfig) else str(value)
        tree.add(f"[bold]{key}[/]").add(rich.syntax.Syntax(text, "yaml", theme="ansi_dark"))
    rich.print(tree)
    if save_to is not None:
        Path(save_to).parent.mkdir(parents=True, exist_ok=True)
        Path(save_to).write_text(OmegaConf.to_yaml(cfg, resolve=True))


def instantiate_group(group: DictConfig | dict | None) -> list[Any]:
    """Instantiate every entry of a name → config mapping (callbacks, loggers); ``null`` entries are skipped."""
    return [instantiate(c) for c in (group or {}).values() if c is not None]
