"""Frozen feature encoders: images in [-1, 1] -> a grid of discriminative features (B, h*w, D).

What DiGIT quantizes with K-means (reference/digit.md §1): one feature vector per image patch, raster order. An
encoder sets ``image_size`` (the pixel size it takes), ``feature_dim`` (D) and ``grid`` (h, w), implements
``forward`` and stays frozen and in eval mode, like a tokenizer.
"""

from __future__ import annotations

import torch
from torch import nn


class FeatureEncoder(nn.Module):
    image_size: int
    feature_dim: int
    grid: tuple[int, int]

    @property
    def seq_len(self) -> int:
        return self.grid[0] * self.grid[1]

    def freeze(self) -> None:
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "FeatureEncoder":
        return super().train(False)

    def check_images(self, img: torch.Tensor) -> None:
        """Shape check on python ints only (no host sync)."""
        want = (3, self.image_size, self.image_size)
        if img.ndim != 4 or tuple(img.shape[1:]) != want:
            raise ValueError(f"encoder: expected images (B, {want[0]}, {want[1]}, {want[2]}) in [-1, 1], "
                             f"got {tuple(img.shape)}")

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        """(B, 3, image_size, image_size) in [-1, 1] -> (B, h*w, feature_dim), raster order over ``grid``."""
        raise NotImplementedError
