"""Vector-quantised (discrete) tokenizers: images in [-1, 1] <-> (B, L) int64 code ids.

``moments`` is the encoder's pre-quantisation latent, one D-vector per grid cell (B, L, D), fp32: what a token cache
stores. ``sample`` maps it to the nearest codebook entry's id (deterministic; the generator is unused), ``decode``
looks ids up in the codebook and runs the decoder. ``vocab_size`` marks the tokenizer as discrete for the token-AR
modules (``TokenARModule.build_net``: ``model=gpt_*``, ``loss=categorical``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from contgen.tokenizers.base import Tokenizer


def nearest_code(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """(..., D) latents -> (...) int64 id of the nearest row of ``codebook`` (K, D) in squared L2, fp32.

    |z|² + |e|² − 2 z·e, as taming's ``VectorQuantizer2.forward`` (DiGIT image_generation_stage2/taming/modules/
    vqvae/quantize.py:278-284); in fp32 even under autocast, where a bf16 distance would swap near ties.
    """
    with torch.autocast(device_type=z.device.type, enabled=False):
        flat, e = z.reshape(-1, z.shape[-1]).float(), codebook.float()
        d = flat.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * flat @ e.t()
        return d.argmin(1).reshape(z.shape[:-1])


def vq_loss(z: torch.Tensor, z_q: torch.Tensor, beta: float) -> torch.Tensor:
    """VQ-VAE's codebook + commitment terms (van den Oord et al. 2017, eq. 3): |sg[z] − e|² + β |z − sg[e]|².

    (taming's ``legacy=True`` puts β on the codebook term instead, quantize.py:290-295; this is the paper's form.)
    """
    return F.mse_loss(z_q, z.detach()) + beta * F.mse_loss(z, z_q.detach())


class VQTokenizer(Tokenizer):
    """Discrete tokenizer over a codebook ``quantize.embedding`` (K, D); subclasses build ``encoder``/``decoder`` and
    implement ``latents`` (images -> (B, D, h, w)) and ``pixels`` ((B, D, h, w) -> images in [-1, 1])."""

    vocab_size: int

    def init_codebook(self, vocab_size: int, dim: int) -> None:
        self.vocab_size = vocab_size
        self.token_dim = self.moment_dim = dim
        self.quantize = nn.Module()
        self.quantize.embedding = nn.Embedding(vocab_size, dim)  # taming's key: quantize.embedding.weight

    def latents(self, img: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def pixels(self, z_q: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def moments(self, img: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, L, D) pre-quantisation latents, row-major over the grid, fp32."""
        self.check_images(img)
        return self.latents(img).float().flatten(2).transpose(1, 2)

    def sample(self, moments: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return nearest_code(moments, self.quantize.embedding.weight)

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        b, n = ids.shape
        h, w = self.grid
        if n != h * w:
            raise ValueError(f"tokenizer: expected ids (B, {h * w}) for the {h}x{w} grid, got {tuple(ids.shape)}")
        z_q = self.quantize.embedding(ids).transpose(1, 2).reshape(b, self.token_dim, h, w)
        return self.pixels(z_q)
