"""``python sample.py ckpt=...``: a PNG grid and an ADM-style .npz per seed; see conf/sample.yaml."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from contgen.cli.console import progress, setup
from contgen.cli.load import load_module
from contgen.utils.images import save_grid, save_npz


def sample(cfg: DictConfig) -> list[Path]:
    setup(cfg.get("threads", "auto"), cfg.get("device", "auto"))
    for key in ("batch_size", "per_class"):
        if cfg[key] < 1:
            raise ValueError(f"{key} must be >= 1, got {cfg[key]}")
    if not cfg.seeds:
        raise ValueError("seeds must list at least one seed, e.g. seeds=[0]")
    overrides = {f"sampler.{k}": v for k, v in OmegaConf.to_container(cfg.sampler).items()}
    overrides["tokenizer.ckpt_path"] = cfg.tokenizer_ckpt_path
    overrides["module.sample_precision"] = cfg.precision
    overrides["module.compile"], overrides["module.cuda_graphs"] = cfg.compile, cfg.cuda_graphs
    module, _ = load_module(cfg.ckpt, cfg.device, overrides, cfg.reference, cfg.allow_pickle)
    num_classes = module.num_classes
    classes = list(cfg.classes) if cfg.classes is not None else list(range(min(num_classes, 10)))
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"classes: {bad} outside [0, {num_classes})")
    labels = torch.tensor(classes, device=module.device).repeat_interleave(cfg.per_class)
    out, written = Path(cfg.out_dir), []
    for seed in cfg.seeds:
        g = torch.Generator(module.device).manual_seed(int(seed))
        chunks = labels.split(cfg.batch_size)
        images = torch.cat([module.generate(chunk, generator=g, use_ema=cfg.use_ema)
                            for chunk in progress(chunks, f"seed {seed}: sampling {len(labels)} images (batches)")])
        written += [save_grid(images, out / f"samples_seed{seed}.png", nrow=cfg.per_class),
                    save_npz(images, labels, out / f"samples_seed{seed}.npz")]
    print("\n".join(f"wrote {p}" for p in written))
    return written
