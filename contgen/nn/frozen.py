"""What the frozen image networks share (tokenizers, feature encoders): they stay in eval mode and check image
shapes before any compute."""

from __future__ import annotations

import torch
from torch import nn


class FrozenImageModule(nn.Module):
    """Subclasses set ``image_size``, ``channels`` and ``grid`` (h, w) and call :meth:`freeze` at the end of
    ``__init__``. The module always stays in eval mode: a Lightning ``model.train()`` must not flip it to training.
    ``role`` names it in errors; its input size is ``tokenizer.image_size`` either way (an encoder sees the images of
    the tokenizer it serves)."""

    image_size: int
    channels: int = 3
    grid: tuple[int, int]
    role = "tokenizer"

    @property
    def seq_len(self) -> int:
        return self.grid[0] * self.grid[1]

    def freeze(self) -> None:
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "FrozenImageModule":
        return super().train(False)

    def check_images(self, img: torch.Tensor) -> None:
        """Shape check on python ints only (no host sync)."""
        want = (self.channels, self.image_size, self.image_size)
        if img.ndim != 4 or tuple(img.shape[1:]) != want:
            raise ValueError(f"{self.role}: expected images (B, {want[0]}, {want[1]}, {want[2]}) in [-1, 1] "
                             f"(tokenizer.image_size={self.image_size}), got {tuple(img.shape)}")
