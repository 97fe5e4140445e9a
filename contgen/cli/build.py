"""Build the data module and the Lightning module from a (resolved) config, with early shape checks."""

from __future__ import annotations

from hydra.utils import get_class, instantiate
from omegaconf import DictConfig

from contgen.modules.base import GenerativeModule
from contgen.modules.datamodule import DataModule


def build_datamodule(cfg: DictConfig) -> DataModule:
    return instantiate(cfg.data, _recursive_=True, _convert_="object")


def build_module(cfg: DictConfig, num_classes: int, data_info: dict | None = None) -> GenerativeModule:
    """The LightningModule that ``module._target_`` names (the method preset picks it), built by its ``from_config``.
    ``data_info`` (image_size, seq_len, token_dim of a token cache) is checked against the tokenizer before any
    compute is spent."""
    tokenizer = instantiate(cfg.tokenizer)
    for key, value in (data_info or {}).items():
        mine = getattr(tokenizer, key, None)
        if value is not None and mine is not None and mine != value:
            raise ValueError(f"data and tokenizer disagree on {key}: data gives {value}, tokenizer "
                             f"{cfg.tokenizer._target_} has {mine} (check data.image_size / tokenizer.* / the cache)")
    cls = get_class(cfg.module._target_)
    if not (isinstance(cls, type) and issubclass(cls, GenerativeModule)):
        raise ValueError(f"module._target_={cfg.module._target_} is not a contgen GenerativeModule")
    return cls.from_config(cfg, tokenizer, num_classes)


def data_info(dataset) -> dict:
    return {k: getattr(dataset, k, None) for k in ("image_size", "seq_len", "token_dim")}
