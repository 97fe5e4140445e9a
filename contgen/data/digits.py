"""scikit-learn's handwritten digits (8×8 grey, 1797 images, shipped with scikit-learn: no download),
upsampled bilinearly to ``image_size`` and repeated to 3 channels in [-1, 1]."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

SPLITS = ("train", "val")


class Digits(Dataset):
    """Deterministic train/val split (``val_fraction`` of each class, chosen by ``seed``); labels 0–9.

    ``repeat``: passes over the images per epoch. The set is small (1617 training images, 25 batches of 64), so
    the default run's 6 epochs would be only 150 steps; an epoch of several passes keeps the step count in line
    with the other built-in data without a separate trainer setting per data set.
    """

    def __init__(self, image_size: int = 32, split: str = "train", seed: int = 0, val_fraction: float = 0.1,
                 repeat: int = 1):
        from sklearn.datasets import load_digits

        if split not in SPLITS:
            raise ValueError(f"data.train.split: unknown split {split!r}; expected one of {SPLITS}")
        if repeat < 1:
            raise ValueError(f"data.train.repeat must be >= 1, got {repeat}")
        digits = load_digits()
        images = torch.from_numpy(digits.images.astype(np.float32) / 16.0)  # values 0..16
        labels = torch.from_numpy(digits.target.astype(np.int64))
        rng = np.random.default_rng(seed)
        val = np.zeros(len(labels), dtype=bool)
        for c in range(10):  # stratified: the same fraction of every class
            idx = np.flatnonzero(digits.target == c)
            val[rng.choice(idx, size=max(1, round(val_fraction * len(idx))), replace=False)] = True
        keep = torch.from_numpy(val if split == "val" else ~val)
        x = F.interpolate(images[keep][:, None], size=(image_size, image_size), mode="bilinear", align_corners=False)
        self.images = (x * 2 - 1).clamp(-1, 1).expand(-1, 3, -1, -1).contiguous()
        self.labels = labels[keep]
        self.image_size, self.num_classes, self.class_names = image_size, 10, [str(i) for i in range(10)]
        self.repeat = repeat

    def __len__(self) -> int:
        return len(self.labels) * self.repeat

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        index %= len(self.labels)
        return {"image": self.images[index], "label": self.labels[index]}
