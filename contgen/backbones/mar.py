"""MAR's MAE-style encoder/decoder (Li et al. 2024, Sec. 3.4; reference models/mar.py:172-230).

The encoder sees only the buffer and the visible tokens; the decoder sees the full sequence with
``mask_token`` at the masked positions. Every row of a batch has the same ``num_masked`` (MAR draws
one mask ratio per batch), so the visible set is ``order[:, num_masked:]``, gathered with a static
shape instead of the reference's ``nonzero`` (no host sync, compiles). The visible indices are sorted
so the encoder sees them in the reference's (positional) order. The buffer slots are never masked.
Tokens are (B, L, token_dim) or, with ``vocab_size``, ids (B, L) (``z_proj`` an embedding; MAR Table 1's
cross-entropy cells). Only visible tokens are read, so a masked position's value cannot reach z.

``encoder_len`` (set by ``module.compile``): in training the encoder's sequence is padded to this many slots, which
the pad slots cannot be attended from, so its shape is the same every step and the compiled encoder never recompiles
(one ratio per batch makes the visible count vary from step to step; a symbolic length fails Inductor's LayerNorm
backward in torch 2.11). The pad slots cost ≈ 5% more FLOPs in MAR-B; the result changes only by rounding.
"""

from __future__ import annotations

import torch
from torch import nn

from contgen.backbones.base import MaskedTokenBackbone
from contgen.nn import Block

# Reference presets (mar.py:332-353); configs pass these numbers explicitly.
SIZES = {
    "B": dict(encoder_embed_dim=768, encoder_depth=12, encoder_num_heads=12,
              decoder_embed_dim=768, decoder_depth=12, decoder_num_heads=12),
    "L": dict(encoder_embed_dim=1024, encoder_depth=16, encoder_num_heads=16,
              decoder_embed_dim=1024, decoder_depth=16, decoder_num_heads=16),
    "H": dict(encoder_embed_dim=1280, encoder_depth=20, encoder_num_heads=16,
              decoder_embed_dim=1280, decoder_depth=20, decoder_num_heads=16),
}


def _blocks(dim: int, depth: int, heads: int, mlp_ratio: float, attn_drop: float, proj_drop: float) -> nn.ModuleList:
    return nn.ModuleList([Block(dim, heads, mlp_ratio, qkv_bias=True, attn_drop=attn_drop, proj_drop=proj_drop)
                          for _ in range(depth)])


class MARBackbone(MaskedTokenBackbone):
    """z = decoder(encoder(buffer ⊕ visible tokens) scattered into mask tokens); ``cond_dim`` = decoder width."""

    def __init__(self, seq_len: int, token_dim: int | None, num_classes: int, encoder_embed_dim: int,
                 encoder_depth: int, encoder_num_heads: int, decoder_embed_dim: int, decoder_depth: int,
                 decoder_num_heads: int, mlp_ratio: float = 4.0, buffer_size: int = 64, label_drop_prob: float = 0.1,
                 attn_dropout: float = 0.1, proj_dropout: float = 0.1, grad_checkpointing: bool = False,
                 vocab_size: int | None = None):
        super().__init__(seq_len, token_dim, num_classes, encoder_embed_dim, buffer_size, label_drop_prob,
                         grad_checkpointing, vocab_size)
        self.cond_dim = decoder_embed_dim
        n = seq_len + buffer_size
        self.z_proj = self.input_proj(encoder_embed_dim)  # Linear(token_dim, ·) or Embedding(vocab_size, ·)
        self.z_proj_ln = nn.LayerNorm(encoder_embed_dim, eps=1e-6)
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, n, encoder_embed_dim))
        self.encoder_blocks = _blocks(encoder_embed_dim, encoder_depth, encoder_num_heads, mlp_ratio,
                                      attn_dropout, proj_dropout)
        self.encoder_norm = nn.LayerNorm(encoder_embed_dim, eps=1e-6)
        self.decoder_embed = nn.Linear(encoder_embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, n, decoder_embed_dim))
        self.decoder_blocks = _blocks(decoder_embed_dim, decoder_depth, decoder_num_heads, mlp_ratio,
                                      attn_dropout, proj_dropout)
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, seq_len, decoder_embed_dim))
        self.encoder_len: int | None = None
        self.init_weights()

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor, order: torch.Tensor, num_masked: int,
                drop: torch.Tensor | None = None) -> torch.Tensor:
        self.check_inputs(tokens, order, num_masked)
        b, buf = tokens.shape[0], self.buffer_size
        visible = order[:, num_masked:].sort(dim=1).values  # (B, V) image positions, V = L - num_masked

        # encoder: buffer (class token) ⊕ visible tokens, each with its position embedding
        index = visible if self.vocab_size else visible[..., None].expand(-1, -1, self.token_dim)
        x = self.z_proj(torch.gather(tokens, 1, index))
        pos = self.encoder_pos_embed_learned[0]
        cond = self.condition_tokens(labels, drop).to(x.dtype)
        x = self.z_proj_ln(torch.cat([cond + pos[:buf], x + pos[buf:][visible]], dim=1))
        n, keys = x.shape[1], None
        if self.encoder_len is not None and torch.is_grad_enabled():
            if n > self.encoder_len:
                raise ValueError(f"MARBackbone.encoder_len={self.encoder_len} < the {n} encoder slots of this step")
            keys = torch.arange(self.encoder_len, device=x.device) < n
            x = nn.functional.pad(x, (0, 0, 0, self.encoder_len - n))
        x = self.encoder_norm(self.run_blocks(self.encoder_blocks, x, keys))[:, :n]

        # decoder: full sequence, mask_token where nothing was encoded
        x = self.decoder_embed(x)
        d = x.shape[-1]
        full = self.mask_token.to(x.dtype).expand(b, self.seq_len, d)
        full = torch.scatter(full, 1, visible[..., None].expand(-1, -1, d), x[:, buf:])
        x = torch.cat([x[:, :buf], full], dim=1) + self.decoder_pos_embed_learned
        x = self.decoder_norm(self.run_blocks(self.decoder_blocks, x))
        return x[:, buf:] + self.diffusion_pos_embed_learned
