"""Build the data module and the Lightning module from a (resolved) config, with early shape checks."""

from __future__ import annotations

import copy

import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, ListConfig, open_dict

from contgen.modules.base import GenerativeModule
from contgen.modules.datamodule import DataModule


# keys of ``data`` that plan the batch (see ``batch_plan``); the DataModule takes the per-device batch they give
BATCH_PLAN_KEYS = ("global_batch_size", "max_device_batch_size")


def build_datamodule(cfg: DictConfig) -> DataModule:
    cfg = copy.deepcopy(cfg)  # the data node keeps its parent: ${seed} and the like resolve as in the run's config
    with open_dict(cfg.data):
        for key in BATCH_PLAN_KEYS:
            cfg.data.pop(key, None)
    return instantiate(cfg.data, _recursive_=True, _convert_="object")


def world_size(trainer: DictConfig) -> int:
    """The processes the Trainer will run: ``trainer.devices`` (a count, a list of ids, -1 or "auto") × ``num_nodes``."""
    devices = trainer.devices
    if isinstance(devices, (list, tuple, ListConfig)):
        count = len(devices)
    elif isinstance(devices, str) and "," in devices:
        count = len([d for d in devices.split(",") if d.strip()])
    elif devices in (-1, "-1", "auto"):
        gpu = trainer.accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available()
        count = torch.cuda.device_count() if gpu else 1  # Lightning runs one CPU process for "auto"
    else:
        count = int(devices)
    return count * int(trainer.num_nodes or 1)


def batch_plan(data: DictConfig, trainer: DictConfig) -> tuple[int, int]:
    """(per-device batch, gradient accumulation steps).

    ``data.global_batch_size`` is the recipe's batch: it is split over devices × nodes, and where the share of a
    device exceeds ``data.max_device_batch_size`` it is accumulated over the fewest micro-batches that fit, so the
    optimizer always sees the same batch (and the learning rate, ``blr × global / 256``, stays the recipe's)
    whatever the device count. Without it, ``data.batch_size`` is per device and
    ``trainer.accumulate_grad_batches`` is taken as given."""
    total = data.get("global_batch_size")
    if total is None:
        return data.batch_size, trainer.accumulate_grad_batches
    if data.batch_size is not None:
        raise ValueError(f"data.global_batch_size={total} and data.batch_size={data.batch_size} are both set: the "
                         "per-device batch is derived from the global one; pass data.batch_size=null (and "
                         "data.max_device_batch_size=N to cap what one device holds)")
    if trainer.accumulate_grad_batches != 1:
        raise ValueError(f"trainer.accumulate_grad_batches={trainer.accumulate_grad_batches} with "
                         f"data.global_batch_size={total}: accumulation is derived; cap the per-device batch with "
                         "data.max_device_batch_size instead")
    world, cap = world_size(trainer), data.get("max_device_batch_size")
    if total < 1 or total % world:
        raise ValueError(f"data.global_batch_size={total} does not split over {world} device(s) (trainer.devices × "
                         "trainer.num_nodes): use a multiple of the device count")
    if cap is not None and cap < 1:
        raise ValueError(f"data.max_device_batch_size must be >= 1 or null, got {cap}")
    share = total // world
    accumulate = next(k for k in range(1, share + 1) if share % k == 0 and (cap is None or share // k <= cap))
    return share // accumulate, accumulate


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
