"""EAR's single bidirectional stack (Shao et al. 2025; reference models/ear.py:161-199).

Unlike MAR there is no sparse encoder: one ViT of MAR's encoder + decoder depth runs on the buffer
plus all ``seq_len`` positions, with ``mask_token`` at the masked ones. The reference's
drop-and-repad equals ``torch.where(mask, mask_token, z_proj(x))``. Masked inputs are zeroed before
``z_proj`` so that garbage there (even NaN/inf) cannot reach the output or the gradients; with ``vocab_size``
(tokens are ids (B, L), ``z_proj`` an embedding) masked ids are set to 0 first (any id, even out of range, is safe).
Dropped from MAR: ``z_proj_ln``, the encoder position embedding, ``decoder_embed`` and
``diffusion_pos_embed_learned``; the kept parameters carry the reference's ``decoder_*`` names.
"""

from __future__ import annotations

import torch
from torch import nn

from contgen.backbones.base import MaskedTokenBackbone
from contgen.nn import Block
from contgen.samplers.schedules import mask_from_order

# Reference presets (models/ear.py:294-312); configs pass these numbers explicitly.
SIZES = {
    "B": dict(embed_dim=768, depth=24, num_heads=12),
    "L": dict(embed_dim=1024, depth=32, num_heads=16),
    "H": dict(embed_dim=1280, depth=40, num_heads=16),
}


class EARBackbone(MaskedTokenBackbone):
    """z = ViT(buffer ⊕ [mask_token | z_proj(token)] + pos)[buffer:]; ``cond_dim`` = ``embed_dim``."""

    def __init__(self, seq_len: int, token_dim: int | None, num_classes: int, embed_dim: int, depth: int,
                 num_heads: int, mlp_ratio: float = 4.0, buffer_size: int = 64, label_drop_prob: float = 0.1,
                 attn_dropout: float = 0.1, proj_dropout: float = 0.1, grad_checkpointing: bool = False,
                 vocab_size: int | None = None):
        super().__init__(seq_len, token_dim, num_classes, embed_dim, buffer_size, label_drop_prob, grad_checkpointing,
                         vocab_size)
        self.cond_dim = embed_dim
        self.z_proj = self.input_proj(embed_dim)  # Linear(token_dim, ·) or Embedding(vocab_size, ·)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, seq_len + buffer_size, embed_dim))
        self.decoder_blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, attn_drop=attn_dropout, proj_drop=proj_dropout)
            for _ in range(depth)])
        self.decoder_norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.init_weights()

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor, order: torch.Tensor, num_masked: int,
                drop: torch.Tensor | None = None) -> torch.Tensor:
        self.check_inputs(tokens, order, num_masked)
        mask = mask_from_order(order, num_masked)  # (B, L), True = masked
        if self.vocab_size:  # ids: masked ones become id 0 (any valid id; replaced by mask_token below)
            x = self.z_proj(tokens.masked_fill(mask, 0))
        else:
            x = self.z_proj(tokens.masked_fill(mask[..., None], 0.0))
        x = torch.where(mask[..., None], self.mask_token.to(x.dtype), x)
        x = torch.cat([self.condition_tokens(labels, drop).to(x.dtype), x], dim=1) + self.decoder_pos_embed_learned
        x = self.decoder_norm(self.run_blocks(self.decoder_blocks, x))
        return x[:, self.buffer_size:]
