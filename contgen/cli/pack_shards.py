"""``python pack_shards.py``: write a data set (images, an image folder's files, or a token cache) into tar shards."""

from __future__ import annotations

from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from contgen.cli.console import setup
from contgen.data.webdataset import pack_shards as write_shards


def pack_shards(cfg: DictConfig) -> Path:
    setup(cfg.get("threads", "auto"), "cpu")
    train = OmegaConf.to_container(cfg.data.train, resolve=True)
    # the shards hold each image once, unflipped: the loader flips (data.train.hflip of data=webdataset)
    train.update({k: v for k, v in (("hflip", False), ("repeat", 1)) if k in train})
    if train["_target_"] == "contgen.data.webdataset.WebDatasetShards":
        raise ValueError("data=webdataset: these are shards already; pack an image folder, a built-in set or a "
                         "token cache")
    dataset = instantiate(train)
    out = write_shards(dataset, cfg.out, maxcount=cfg.maxcount, source=train)
    print(f"wrote {len(dataset)} samples to {out}; train with: data=webdataset data.shards={out}")
    return out
