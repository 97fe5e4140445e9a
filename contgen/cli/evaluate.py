"""Sample a class-balanced set from a trained module and score it.

* Built-in data (``shapes``, ``digits``): the offline classifier gives FD_builtin (a Fréchet distance on its
  features, comparable only across runs on the same data and classifier version) and the class accuracy of
  the conditional samples.
* Any data, with ``metrics.inception_weights``: FID and IS with torch-fidelity's InceptionV3, against
  ``metrics.ref_stats`` (an ``.npz`` with ``mu``/``sigma``) or statistics computed from the data set.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from contgen.cli.console import progress
from contgen.metrics import (FeatureStats, InceptionFeatures, builtin_metrics, frechet_distance, inception_score,
                             load_or_compute_ref_stats, load_or_train_classifier, load_stats)
from contgen.utils.images import save_grid, save_npz, to_uint8

BUILTIN = {"contgen.data.shapes.Shapes": "shapes", "contgen.data.digits.Digits": "digits"}


def check_metrics(m: DictConfig) -> None:
    for key in ("num_samples", "batch_size"):
        if m[key] < 1:
            raise ValueError(f"metrics.{key} must be >= 1, got {m[key]}")
    if m.inception_weights and not Path(m.inception_weights).is_file():
        raise FileNotFoundError(f"metrics.inception_weights: no file at {m.inception_weights} (torch-fidelity's "
                                "weights-inception-2015-12-05-6726825d.pth)")


def generate_balanced(module, num_samples: int, batch_size: int, seed: int, use_ema: bool = True):
    """``num_samples`` images, labels cycling over the classes; one generator for the whole set."""
    labels = torch.arange(num_samples, device=module.device) % module.num_classes
    g = torch.Generator(module.device).manual_seed(seed)
    chunks = labels.split(batch_size)
    images = torch.cat([module.generate(chunk, generator=g, use_ema=use_ema).cpu()
                        for chunk in progress(chunks, f"sampling {num_samples} images (batches)")])
    return images, labels.cpu()


def builtin_scores(data_train: dict, images: torch.Tensor, labels: torch.Tensor, cache_dir: str) -> dict:
    name = BUILTIN[data_train["_target_"]]
    data_train = {k: v for k, v in data_train.items() if k != "repeat"}  # the classifier sees each image once
    train_set, heldout = instantiate(data_train), instantiate({**data_train, "split": "val"})
    # a few thousand images train the classifier to ~100% held-out accuracy; more only costs time on first use
    fit_set = instantiate({**data_train, "num_samples": 4096}) if "num_samples" in data_train else train_set
    description = {"name": name, "image_size": train_set.image_size, "num_classes": train_set.num_classes,
                   "seed": data_train.get("seed", 0), "num_samples": len(fit_set)}
    classifier = load_or_train_classifier(fit_set, heldout, description, cache_dir)
    ref = load_or_compute_ref_stats(classifier, train_set, {**description, "num_samples": len(train_set)}, cache_dir)
    scores = builtin_metrics(classifier, images, labels, ref)
    return {"fd_builtin": scores["fd"], "class_acc": scores["class_acc"], "classifier_acc": classifier.heldout_accuracy}


def inception_scores(weights: str, ref_stats: str | None, images: torch.Tensor, dataset, batch_size: int,
                     device: torch.device) -> dict:
    net = InceptionFeatures(weights).to(device)

    def features(batches, what: str, total: int):
        stats, logits = FeatureStats(), []
        for batch in progress(batches, f"Inception features of {what} (batches)", total):
            out = net(batch.to(device))
            stats.update(out["pool"].double().cpu())
            logits.append(out["logits"].cpu())
        return stats, torch.cat(logits)

    chunks = to_uint8(images).split(batch_size)
    fake, logits = features(chunks, "the samples", len(chunks))
    if ref_stats is not None:
        mu, sigma = load_stats(ref_stats)
    else:  # statistics of the training images themselves
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
        mu, sigma = features((to_uint8(b["image"]) for b in loader), "the data set", len(loader))[0].mu_sigma()
    is_mean, is_std = inception_score(logits, splits=min(10, len(images)))
    return {"fid": frechet_distance(*fake.mu_sigma(), mu, sigma), "is": is_mean, "is_std": is_std}


def evaluate_module(module, cfg: DictConfig | dict, dataset=None, out_dir: str | Path = ".") -> dict:
    """Score ``module`` as ``cfg.metrics`` says; writes metrics.json, a sample grid and the samples' .npz."""
    cfg = OmegaConf.create(cfg) if isinstance(cfg, dict) else cfg
    m, out = cfg.metrics, Path(out_dir)
    images, labels = generate_balanced(module, m.num_samples, m.batch_size, m.seed, m.use_ema)
    results: dict = {"num_samples": m.num_samples}
    data_train = OmegaConf.to_container(cfg.data.train, resolve=True)
    if m.builtin == "auto" and data_train.get("_target_") in BUILTIN:
        results.update(builtin_scores(data_train, images, labels, cfg.paths.cache_dir))
    if m.inception_weights:
        results.update(inception_scores(m.inception_weights, m.ref_stats, images,
                                        dataset if dataset is not None else instantiate(data_train),
                                        m.batch_size, module.device))
    elif data_train.get("_target_") not in BUILTIN:
        print("metrics.inception_weights is not set: no FID/IS. Place weights-inception-2015-12-05-6726825d.pth "
              "(torch-fidelity release v0.2.0) on disk and pass metrics.inception_weights=/path/to/it")
    per_row = min(10, max(1, m.num_samples // module.num_classes))
    order = torch.argsort(labels[: per_row * module.num_classes], stable=True)
    save_grid(images[order], out / "eval_samples.png", nrow=per_row)
    save_npz(images, labels, out / "eval_samples.npz")
    (out / "metrics.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return results


def evaluate(cfg: DictConfig) -> dict:
    from contgen.cli.console import setup
    from contgen.cli.load import load_module

    setup(cfg.get("threads", "auto"), cfg.get("device", "auto"))
    check_metrics(cfg.metrics)
    overrides = {f"sampler.{k}": v for k, v in OmegaConf.to_container(cfg.sampler).items()}
    overrides["tokenizer.ckpt_path"] = cfg.tokenizer_ckpt_path
    overrides["module.sample_precision"] = cfg.precision
    module, stored = load_module(cfg.ckpt, cfg.device, overrides, cfg.reference, cfg.allow_pickle)
    merged = OmegaConf.create({"data": stored["data"], "metrics": cfg.metrics, "paths": {"cache_dir": cfg.paths.cache_dir}})
    return evaluate_module(module, merged, out_dir=cfg.out_dir)
