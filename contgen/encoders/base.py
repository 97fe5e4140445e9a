"""Frozen feature encoders: images in [-1, 1] -> a grid of discriminative features (B, h*w, D).

What DiGIT quantizes with K-means (reference/digit.md §1): one feature vector per image patch, raster order. An
encoder sets ``image_size`` (the pixel size it takes), ``feature_dim`` (D) and ``grid`` (h, w), implements
``forward`` and stays frozen and in eval mode, like a tokenizer.
"""

from __future__ import annotations

import torch

from contgen.nn.frozen import FrozenImageModule


class FeatureEncoder(FrozenImageModule):
    image_size: int
    feature_dim: int
    grid: tuple[int, int]
    role = "encoder"

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        """(B, 3, image_size, image_size) in [-1, 1] -> (B, h*w, feature_dim), raster order over ``grid``."""
        raise NotImplementedError
