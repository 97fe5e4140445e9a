"""``python cache_tokens.py``: encode a data set once with the tokenizer into a sharded token cache."""

from __future__ import annotations

from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from contgen.cli.console import setup
from contgen.cli.load import pick_device
from contgen.data.cached import cache_tokens as write_cache


def cache_tokens(cfg: DictConfig) -> Path:
    setup(cfg.get("threads", "auto"), cfg.get("device", "auto"))
    train = OmegaConf.to_container(cfg.data.train, resolve=True)
    if "hflip" in train:
        train["hflip"] = False  # the cache stores both views itself; a random flip would corrupt view 0
    dataset = instantiate(train)
    tokenizer = instantiate(cfg.tokenizer)
    out = write_cache(dataset, tokenizer, cfg.out, batch_size=cfg.batch_size, shard_size=cfg.shard_size,
                      dtype=cfg.dtype, num_workers=cfg.num_workers, device=pick_device(cfg.device),
                      tokenizer_info=OmegaConf.to_container(cfg.tokenizer, resolve=True))
    print(f"wrote {len(dataset)} samples to {out}; train with: data=cached data.root={out}")
    return out
