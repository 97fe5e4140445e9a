"""Frozen tokenizer base and MAR's token layout.

A tokenizer maps images in [-1, 1] (NCHW) to a sequence of continuous tokens (B, L, D) and back. Encoding is
split into ``moments`` (deterministic posterior parameters, what a latent cache stores) and ``sample`` (the draw
made from them at train time), so cached and uncached training see the same distribution (MAR caches
mean||logvar and samples per step, reference/mar.md §4).
"""

from __future__ import annotations

import torch

from contgen.nn.frozen import FrozenImageModule


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/p * W/p, C*p*p), row-major over the grid, channel-major inside a token.

    Same element order as MAR's ``patchify`` (models/mar.py:131-139): (c, p_row, p_col) within each token.
    """
    b, c, h, w = x.shape
    if h % p or w % p:
        raise ValueError(f"patchify: spatial size {h}x{w} is not divisible by patch size {p}")
    x = x.reshape(b, c, h // p, p, w // p, p)
    x = torch.einsum("nchpwq->nhwcpq", x)
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def unpatchify(tokens: torch.Tensor, p: int, grid: tuple[int, int]) -> torch.Tensor:
    """Exact inverse of :func:`patchify`: (B, h*w, C*p*p) -> (B, C, h*p, w*p) for ``grid = (h, w)``."""
    b, n, d = tokens.shape
    h, w = grid
    if n != h * w or d % (p * p):
        raise ValueError(f"unpatchify: tokens {tuple(tokens.shape)} do not fit grid {grid} with patch size {p}")
    c = d // (p * p)
    x = tokens.reshape(b, h, w, c, p, p)
    x = torch.einsum("nhwcpq->nchpwq", x)
    return x.reshape(b, c, h * p, w * p)


class Tokenizer(FrozenImageModule):
    """Frozen image <-> token map: ``moments`` → ``sample`` = ``encode``, and ``decode``.

    Subclasses set ``image_size``, ``channels``, ``token_dim`` (D), ``grid`` (h, w), ``moment_dim`` (M),
    implement ``moments``/``sample``/``decode`` and call :meth:`freeze` at the end of ``__init__``.
    """

    token_dim: int
    moment_dim: int

    def moments(self, img: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def sample(self, moments: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, img: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.sample(self.moments(img), generator=generator)
