"""What the masked token-AR backbones (MAR, EAR) share: the class token, the buffer, the init.

Both prepend ``buffer_size`` slots that all hold the class embedding (MAR Sec. 3.4; mar.py:176-186,
EAR models/ear.py:167-176; :meth:`MaskedTokenBackbone.condition_tokens`). The learned null class
``fake_latent`` replaces it where ``drop`` is set:
label dropout in training and the unconditional branch of classifier-free guidance. Parameter names
are those of the reference implementations, so their released state dicts load unchanged.

Tokens are continuous (B, L, token_dim) (the input projection ``z_proj`` is a linear) or, with ``vocab_size`` set,
a discrete tokenizer's ids (B, L) int64 (``z_proj`` is an ``nn.Embedding(vocab_size, dim)`` under the same name: a
linear on one-hot ids, the same math). MAR's Table 1 trains the masked backbone with cross-entropy on VQ ids this way.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class MaskedTokenBackbone(nn.Module):
    """Base of the masked backbones: ``class_emb``, ``fake_latent`` and the reference init.

    Subclasses build their layers (the input projection with :meth:`input_proj`), call :meth:`init_weights` and
    implement ``forward(tokens, labels, order, num_masked, drop=None) -> z (B, L, cond_dim)``, where the masked
    positions are ``order[:, :num_masked]``.
    """

    embeds_ids = True  # takes a discrete tokenizer's ids (vocab_size)

    def __init__(self, seq_len: int, token_dim: int | None, num_classes: int, dim: int, buffer_size: int = 64,
                 label_drop_prob: float = 0.1, grad_checkpointing: bool = False, vocab_size: int | None = None):
        super().__init__()
        if (token_dim is None) == (vocab_size is None):
            raise ValueError(f"{type(self).__name__} needs exactly one of token_dim (continuous tokens) and vocab_size "
                             f"(ids of a discrete tokenizer), got token_dim={token_dim}, vocab_size={vocab_size}")
        for key, value, low in (("seq_len", seq_len, 1), ("token_dim", token_dim, 1), ("vocab_size", vocab_size, 1),
                                ("num_classes", num_classes, 1), ("buffer_size", buffer_size, 1)):
            if value is not None and value < low:  # the class token lives in the buffer: at least one slot
                raise ValueError(f"model.{key} must be >= {low}, got {value}")
        if not 0.0 <= label_drop_prob <= 1.0:
            raise ValueError(f"model.label_drop_prob must be in [0, 1], got {label_drop_prob}")
        self.seq_len, self.token_dim, self.vocab_size, self.num_classes = seq_len, token_dim, vocab_size, num_classes
        self.buffer_size, self.label_drop_prob = buffer_size, label_drop_prob
        self.grad_checkpointing = grad_checkpointing
        self.class_emb = nn.Embedding(num_classes, dim)
        self.fake_latent = nn.Parameter(torch.zeros(1, dim))

    def input_proj(self, dim: int) -> nn.Module:
        """``z_proj``: ``nn.Linear(token_dim, dim)`` for continuous tokens, ``nn.Embedding(vocab_size, dim)`` for ids
        (N(0, 0.02) by :meth:`init_weights`, like every embedding here)."""
        return nn.Embedding(self.vocab_size, dim) if self.vocab_size else nn.Linear(self.token_dim, dim)

    def init_weights(self) -> None:
        """mar.py:107-129: N(0, 0.02) for embeddings, position embeddings, ``mask_token`` and
        ``fake_latent`` (every parameter held directly by the backbone); xavier-uniform linears with
        zero bias; LayerNorm weight 1, bias 0."""
        for p in self.parameters(recurse=False):
            nn.init.normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)
            elif isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def class_tokens(self, labels: torch.Tensor, drop: torch.Tensor | None) -> torch.Tensor:
        """(B, dim) class embeddings, ``fake_latent`` where ``drop``. ``torch.where`` keeps
        ``fake_latent`` in the graph even when nothing is dropped (DDP sees a gradient every step)."""
        if drop is None:
            drop = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
        return torch.where(drop[:, None], self.fake_latent, self.class_emb(labels))

    def condition_tokens(self, labels: torch.Tensor, drop: torch.Tensor | None) -> torch.Tensor:
        """(B, buffer_size, dim): what the buffer slots hold — the class embedding (``fake_latent`` where ``drop``)
        in every slot. The one place the condition enters the sequence: override it for another condition (e.g. a
        prefix of condition ids); the caller adds the buffer's position embeddings and casts to its dtype."""
        return self.class_tokens(labels, drop)[:, None].expand(-1, self.buffer_size, -1)

    def check_inputs(self, tokens: torch.Tensor, order: torch.Tensor, num_masked: int) -> None:
        """Shape and dtype checks on host metadata only (no device reads)."""
        if self.vocab_size:
            if tokens.ndim != 2 or tokens.shape[1] != self.seq_len or tokens.dtype.is_floating_point:
                raise ValueError(f"{type(self).__name__} with model.vocab_size={self.vocab_size} expects token ids "
                                 f"(B, {self.seq_len}) int64, got {tuple(tokens.shape)} {tokens.dtype}")
        elif tokens.ndim != 3 or tokens.shape[1:] != (self.seq_len, self.token_dim):
            raise ValueError(f"backbone expects tokens of shape (B, {self.seq_len}, {self.token_dim}) "
                             f"(model.seq_len, model.token_dim), got {tuple(tokens.shape)}")
        if order.shape != tokens.shape[:2]:
            raise ValueError(f"order must have shape {tuple(tokens.shape[:2])}, got {tuple(order.shape)}")
        if not 0 <= num_masked <= self.seq_len:
            raise ValueError(f"num_masked must be in [0, {self.seq_len}], got {num_masked}")

    def run_blocks(self, blocks: nn.ModuleList, x: torch.Tensor, keys: torch.Tensor | None = None) -> torch.Tensor:
        """Apply ``blocks`` in turn (``keys``: the attendable slots, see ``Attention``), with activation checkpointing
        when enabled and grads are on."""
        for block in blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, keys=keys, use_reentrant=False)
            else:
                x = block(x, keys=keys)
        return x
