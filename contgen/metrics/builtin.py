"""Offline metrics for the built-in data sets (procedural shapes, sklearn digits): FD_builtin and class accuracy.

Inception features mean little on 32-px shapes and need a 100 MB download, so the laptop default trains a small CNN
once on the data set itself (CPU, well under a minute), caches it, and measures generated images with it:

- ``fd``: Fréchet distance between the CNN's embedding of generated images and of real images (the FID formula on
  other features, like FD_DINOv2 in EDM2). **FD_builtin is comparable only across runs on the same built-in data
  (name, image size, seed, ...) and the same classifier version/hyper-parameters** — i.e. the same cache key.
- ``class_acc``: the fraction of generated images the CNN assigns to the class they were generated for.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset

from contgen.metrics.fid import FeatureStats, frechet_distance, load_stats, save_stats

log = logging.getLogger(__name__)

# Bump when the architecture or training recipe changes: it invalidates cached classifiers and reference stats.
VERSION = 1
REQUIRED_DESCRIPTION_KEYS = ("name", "image_size", "num_classes", "seed")


class BuiltinClassifier(nn.Module):
    """Three stride-2 conv stages -> global average pool -> `feature_dim` embedding (GELU) -> linear classifier.

    Global pooling makes it work at any image size (8 px digits to 64 px shapes); ~5 MFLOP per 32-px image.
    """

    def __init__(self, num_classes: int, image_size: int, feature_dim: int = 64, width: int = 32):
        super().__init__()
        self.num_classes, self.image_size, self.feature_dim, self.width = num_classes, image_size, feature_dim, width
        chans = [3, width, 2 * width, 4 * width]
        self.convs = nn.Sequential(
            *(
                nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())
                for cin, cout in zip(chans[:-1], chans[1:])
            )
        )
        self.embed = nn.Linear(chans[-1], feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)
        self.cache_key: str | None = None  # set by load_or_train_classifier; keys the reference-stats cache
        self.heldout_accuracy: float | None = None

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1] -> (N, feature_dim) embedding used for FD_builtin."""
        return F.gelu(self.embed(self.convs(images).mean(dim=(2, 3))))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))

    def config(self) -> dict:
        return {"num_classes": self.num_classes, "image_size": self.image_size, "feature_dim": self.feature_dim,
                "width": self.width}


def _stack(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    items = [dataset[i] for i in range(len(dataset))]
    images = torch.stack([it["image"] for it in items]).float()
    return images, torch.stack([torch.as_tensor(it["label"]) for it in items]).long()


def _check_dataset(dataset: Dataset, description: dict, what: str) -> None:
    for attr in ("num_classes", "image_size"):
        if getattr(dataset, attr, description[attr]) != description[attr]:
            raise ValueError(
                f"{what}: dataset.{attr}={getattr(dataset, attr)} but the description says {description[attr]}"
            )


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _atomic_torch_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


@torch.no_grad()
def _predict(classifier: BuiltinClassifier, images: torch.Tensor, batch_size: int = 512):
    """Features (float32) and predicted labels, batched, in eval mode and fp32 even inside an autocast region."""
    classifier.eval()
    device = next(classifier.parameters()).device
    feats, preds = [], []
    with torch.autocast(device.type, enabled=False):
        for chunk in images.split(batch_size):
            f = classifier.features(chunk.to(device, torch.float32))
            feats.append(f)
            preds.append(classifier.head(f).argmax(1))
    return torch.cat(feats), torch.cat(preds)


def train_classifier(
    classifier: BuiltinClassifier, images: torch.Tensor, labels: torch.Tensor, epochs: int = 4,
    batch_size: int = 64, lr: float = 3e-3, seed: int = 0,
) -> BuiltinClassifier:
    """Adam with a cosine learning-rate decay over `epochs` passes of seeded shuffles (CPU, a few seconds)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(classifier.parameters(), lr=lr)
    steps = epochs * math.ceil(len(images) / batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    classifier.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(images), generator=gen).split(batch_size):
            loss = F.cross_entropy(classifier(images[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return classifier.eval()


def load_or_train_classifier(
    train_set: Dataset, heldout_set: Dataset, description: dict, cache_dir, *, feature_dim: int = 64,
    width: int = 32, epochs: int = 4, batch_size: int = 64, lr: float = 3e-3, seed: int = 0,
    min_accuracy: float = 0.95,
) -> BuiltinClassifier:
    """Load the cached classifier for `description`, or train it on `train_set` once and cache it.

    description: plain dict naming the data the classifier is trained on; must contain name, image_size, num_classes
    and seed (add anything else that changes the images). Together with the architecture, training hyper-parameters
    and `VERSION` it forms the cache key, so `train_set`/`heldout_set` must be what it describes. The held-out
    accuracy is logged, stored in the cache and kept as `classifier.heldout_accuracy`; below `min_accuracy` a
    warning says that FD_builtin/class_acc are unreliable. Returns a frozen classifier in eval mode on the CPU.
    """
    missing = [k for k in REQUIRED_DESCRIPTION_KEYS if k not in description]
    if missing:
        raise ValueError(f"load_or_train_classifier: description lacks {missing}; got {sorted(description)}")
    for ds, what in ((train_set, "train_set"), (heldout_set, "heldout_set")):
        _check_dataset(ds, description, what)
    arch = {"feature_dim": feature_dim, "width": width}
    recipe = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed}
    key = _hash({"version": VERSION, "description": description, "arch": arch, "recipe": recipe})
    path = Path(cache_dir) / f"builtin_classifier_{description['name']}_{key}.pt"
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's global RNG
        torch.manual_seed(seed)
        classifier = BuiltinClassifier(description["num_classes"], description["image_size"], **arch)
    if path.is_file():
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        classifier.load_state_dict(ckpt["state_dict"])
        accuracy = ckpt["heldout_accuracy"]
    else:
        t0 = time.perf_counter()
        images, labels = _stack(train_set)
        train_classifier(classifier, images, labels, epochs, batch_size, lr, seed)
        val_images, val_labels = _stack(heldout_set)
        accuracy = (_predict(classifier, val_images)[1] == val_labels).double().mean().item()
        log.info("builtin classifier %s: held-out accuracy %.4f, trained in %.1f s", path.name, accuracy,
                 time.perf_counter() - t0)
        ckpt = {"version": VERSION, "description": dict(description), "config": classifier.config(), "recipe": recipe,
                "heldout_accuracy": accuracy, "state_dict": classifier.state_dict()}
        _atomic_torch_save(ckpt, path)
    if accuracy < min_accuracy:
        warnings.warn(f"builtin classifier {path.name}: held-out accuracy {accuracy:.3f} < {min_accuracy}; "
                      "FD_builtin and class_acc are unreliable")
    classifier.cache_key, classifier.heldout_accuracy = key, accuracy
    return classifier.requires_grad_(False).eval()


def load_or_compute_ref_stats(
    classifier: BuiltinClassifier, dataset: Dataset, description: dict, cache_dir=None,
) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of the classifier's features over all real images of `dataset` (described by `description`).

    Cached as `.npz` next to the classifier, keyed by the classifier's cache key and `description`; not cached when
    `cache_dir` is None or the classifier did not come from `load_or_train_classifier`.
    """
    path = None
    if cache_dir is not None and classifier.cache_key is not None:
        path = Path(cache_dir) / f"builtin_ref_{classifier.cache_key}_{_hash(description)}.npz"
        if path.is_file():
            return load_stats(path)
    stats = FeatureStats()
    stats.update(_predict(classifier, _stack(dataset)[0])[0])
    mu, sigma = stats.mu_sigma()
    if path is not None:
        save_stats(path, mu, sigma)
    return mu, sigma


def builtin_metrics(
    classifier: BuiltinClassifier, images: torch.Tensor, labels: torch.Tensor, ref_stats: tuple, batch_size: int = 512,
) -> dict[str, float]:
    """FD_builtin against `ref_stats` and the class accuracy of `images` (N,3,H,W) in [-1,1] generated for `labels`."""
    if images.ndim != 4 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"builtin_metrics: images {tuple(images.shape)} and labels {tuple(labels.shape)} mismatch")
    feats, preds = _predict(classifier, images, batch_size)
    stats = FeatureStats()
    stats.update(feats)
    fd = frechet_distance(*stats.mu_sigma(), *ref_stats)
    class_acc = (preds == labels.to(preds.device)).double().mean().item()
    return {"fd": fd, "class_acc": class_acc}
