"""Build the data module and the Lightning module from a (resolved) config, with early shape checks."""

from __future__ import annotations

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from contgen.modules.datamodule import DataModule
from contgen.modules.token_ar import TokenARModule


def build_datamodule(cfg: DictConfig) -> DataModule:
    return instantiate(cfg.data, _recursive_=True, _convert_="object")


def build_module(cfg: DictConfig, num_classes: int, data_info: dict | None = None) -> TokenARModule:
    """``data_info`` (image_size, seq_len, token_dim of a token cache) is checked against the tokenizer
    before any compute is spent."""
    tokenizer = instantiate(cfg.tokenizer)
    for key, value in (data_info or {}).items():
        mine = getattr(tokenizer, key, None)
        if value is not None and mine is not None and mine != value:
            raise ValueError(f"data and tokenizer disagree on {key}: data gives {value}, tokenizer "
                             f"{cfg.tokenizer._target_} has {mine} (check data.image_size / tokenizer.* / the cache)")
    return TokenARModule(
        tokenizer=tokenizer, backbone=instantiate(cfg.model), head=instantiate(cfg.loss),
        sampler=instantiate(cfg.sampler), num_classes=num_classes,
        optim=OmegaConf.to_container(cfg.optim, resolve=True), mask_ratio_min=cfg.module.mask_ratio_min,
        seed=cfg.seed, compile=cfg.module.compile, sample_precision=cfg.module.sample_precision,
        config=OmegaConf.to_container(cfg, resolve=True))


def data_info(dataset) -> dict:
    return {k: getattr(dataset, k, None) for k in ("image_size", "seq_len", "token_dim")}
