"""Pixel-patch tokenizer: tokens are raw p x p pixel patches (no learned weights).

Useful as a lossless baseline and for fast tests: ``decode(encode(x)) == x`` bit-exactly.
"""

from __future__ import annotations

import torch

from contgen.tokenizers.base import Tokenizer, patchify, unpatchify


class PatchTokenizer(Tokenizer):
    def __init__(self, image_size: int, patch_size: int, channels: int = 3):
        super().__init__()
        if patch_size <= 0 or image_size % patch_size:
            raise ValueError(
                f"tokenizer.image_size={image_size} must be divisible by tokenizer.patch_size={patch_size}"
            )
        self.image_size = image_size
        self.channels = channels
        self.patch_size = patch_size
        self.grid = (image_size // patch_size,) * 2
        self.token_dim = channels * patch_size**2
        self.moment_dim = self.token_dim
        self.freeze()

    def moments(self, img: torch.Tensor) -> torch.Tensor:
        self.check_images(img)
        return patchify(img, self.patch_size)

    def sample(self, moments: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return moments

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        return unpatchify(tokens, self.patch_size, self.grid)
