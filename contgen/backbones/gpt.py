"""Causal GPT over a fixed token order: DiGIT's stage-1 decoder (Zhu et al. 2024; reference/digit.md §2).

DiGIT's model is a fairseq ``TransformerDecoder`` without encoder attention: post-LN (``normalize_before`` False,
so no final LayerNorm), GELU, FFN 4×, dropout 0.1 after attention and FFN and on the embeddings, attention dropout
0, token embeddings scaled by √d, learned absolute positions, untied output projection. ``norm_first=True`` gives
the pre-LN variant (fairseq ``normalize_before``: pre-LN layers plus a final LayerNorm).

Sequence (digit.md §2, ``model.py:113-117, 162-163``): the first input slot holds the class embedding (DiGIT puts
``class_id + len(dict)`` rows in the token table), slot i > 0 holds the token generated at step i - 1, and the
output of slot i conditions the token at step i. DiGIT also predicts a final EOS from the last token; contgen has
fixed-length sequences and drops that target (L targets instead of L + 1). Step i generates image position
``order[i]``: raster by default, any fixed permutation by ``model.order``; positions embed the step (slot).

The per-token contract matches the masked backbones: ``forward`` returns z (B, L, cond_dim) in *image position*
order, z[:, p] the condition of the token at position p (it sees the class and the tokens before p in the order),
so any head (``categorical`` for ids; ``diffusion``, ``energy``, ``flow``... for continuous tokens) takes
``head.loss(tokens[rows], z[rows])`` over all rows. Tokens are discrete ids (B, L) int64 when ``vocab_size`` is set
(a discrete tokenizer: an embedding table), or continuous (B, L, token_dim) (a linear input projection).

With ``prefix_len`` P > 0 (DiGIT's AR pixel decoder, ``prefix.py``) the sequence is ``[P condition ids | start |
tokens]``, causal over all of it as DiGIT's prefix-LM, and ``labels`` are the (B, P) condition ids.

Sampling (``contgen/samplers/causal.py``) decodes one slot per step with :meth:`decode` into a key/value cache
preallocated by :meth:`new_cache` (fixed shapes; the slot index is a device tensor, so the step can be compiled
or captured).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from contgen.backbones.prefix import check_prefix
from contgen.nn import Block

KVCache = list[tuple[torch.Tensor, torch.Tensor]]


class GPTBackbone(nn.Module):
    """z = GPT(class ⊕ tokens in ``order``, causal); ``cond_dim`` = ``embed_dim``.

    The null class (row ``num_classes`` of ``class_emb``) replaces the class where ``drop`` is set: label dropout
    (``label_drop_prob``, 0 in DiGIT, which has no CFG) and the unconditional branch of CFG.
    """

    causal = True
    embeds_ids = True  # takes a discrete tokenizer's ids (vocab_size)
    takes_prefix = True  # prefix_len condition ids before the start slot (DiGIT stage 2, prefix.py)

    def __init__(self, seq_len: int, num_classes: int, embed_dim: int, depth: int, num_heads: int,
                 token_dim: int | None = None, vocab_size: int | None = None, mlp_ratio: float = 4.0,
                 norm_first: bool = False, dropout: float = 0.1, attn_dropout: float = 0.0, act_dropout: float = 0.0,
                 norm_eps: float = 1e-5, scale_embedding: bool = True, label_drop_prob: float = 0.0,
                 order: list[int] | None = None, prefix_len: int = 0, prefix_vocab: int | None = None,
                 grad_checkpointing: bool = False):
        super().__init__()
        check_prefix(prefix_len, prefix_vocab, label_drop_prob)
        if (token_dim is None) == (vocab_size is None):
            raise ValueError("GPTBackbone needs exactly one of token_dim (continuous tokens) and vocab_size (ids of a "
                             f"discrete tokenizer), got token_dim={token_dim}, vocab_size={vocab_size}")
        sizes = {"seq_len": seq_len, "num_classes": num_classes, "embed_dim": embed_dim, "depth": depth,
                 "num_heads": num_heads, "token_dim": token_dim, "vocab_size": vocab_size}
        for key, value in sizes.items():
            if value is not None and value < 1:
                raise ValueError(f"model.{key} must be >= 1, got {value}")
        if not 0.0 <= label_drop_prob <= 1.0:
            raise ValueError(f"model.label_drop_prob must be in [0, 1], got {label_drop_prob}")
        order = list(range(seq_len)) if order is None else [int(i) for i in order]
        if sorted(order) != list(range(seq_len)):
            raise ValueError(f"model.order must be a permutation of 0..{seq_len - 1} (seq_len = the tokenizer's "
                             f"grid), or null for raster order; got {len(order)} entries")
        self.seq_len, self.token_dim, self.vocab_size, self.num_classes = seq_len, token_dim, vocab_size, num_classes
        self.cond_dim, self.label_drop_prob, self.grad_checkpointing = embed_dim, label_drop_prob, grad_checkpointing
        self.prefix_len = prefix_len  # P condition ids before the start slot (DiGIT stage 2, prefix.py); 0 = a class
        self.embed_scale = math.sqrt(embed_dim) if scale_embedding else 1.0  # fairseq embed_scale
        # the buffers follow model.order, not a checkpoint (the stored config holds the order)
        self.register_buffer("order", torch.tensor(order), persistent=False)  # step -> image position
        self.register_buffer("inverse_order", self.order.argsort(), persistent=False)  # image position -> step

        self.token_emb = nn.Embedding(vocab_size, embed_dim) if vocab_size else nn.Linear(token_dim, embed_dim)
        self.class_emb = nn.Embedding(num_classes + 1, embed_dim)  # + the null class
        self.prefix_emb = nn.Embedding(prefix_vocab, embed_dim) if prefix_len else None
        self.pos_emb = nn.Parameter(torch.zeros(prefix_len + seq_len, embed_dim))  # [prefix | start, tokens]
        self.embed_drop = nn.Dropout(dropout)
        self.decoder_blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, attn_drop=attn_dropout, proj_drop=dropout,
                  norm_first=norm_first, norm_eps=norm_eps, act_drop=act_dropout) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps) if norm_first else nn.Identity()
        self.init_weights()

    def init_weights(self) -> None:
        """fairseq's init: embedding tables and learned positions N(0, d^-1/2) (``Embedding``,
        ``PositionalEmbedding``); attention projections xavier-uniform, output bias 0 (``MultiheadAttention``: q, k,
        v each with gain 1/√2, which is the plain xavier bound of the fused (3d, d) qkv matrix); FFN and the
        continuous input projection keep PyTorch's default ``nn.Linear`` init."""
        std = self.cond_dim ** -0.5
        tables = [self.class_emb.weight, self.pos_emb] + [m.weight for m in (self.token_emb, self.prefix_emb)
                                                            if isinstance(m, nn.Embedding)]
        for p in tables:
            nn.init.normal_(p, std=std)
        for block in self.decoder_blocks:
            nn.init.xavier_uniform_(block.attn.qkv.weight)
            nn.init.xavier_uniform_(block.attn.proj.weight)
            nn.init.zeros_(block.attn.proj.bias)

    # --- inputs -----------------------------------------------------------------------------------
    def check_tokens(self, tokens: torch.Tensor) -> None:
        """Shape and dtype checks on host metadata only."""
        if self.vocab_size:
            if tokens.shape[1:] != (self.seq_len,) or tokens.dtype.is_floating_point:
                raise ValueError(f"GPT with model.vocab_size={self.vocab_size} expects token ids (B, {self.seq_len}) "
                                 f"int64, got {tuple(tokens.shape)} {tokens.dtype}")
        elif tokens.shape[1:] != (self.seq_len, self.token_dim):
            raise ValueError(f"GPT expects tokens of shape (B, {self.seq_len}, {self.token_dim}) (model.seq_len, "
                             f"model.token_dim), got {tuple(tokens.shape)}")

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embed_scale * self.token_emb(tokens)

    def condition(self, labels: torch.Tensor, drop: torch.Tensor | None) -> torch.Tensor:
        """The slots before the first token, (B, P + 1, d) unpositioned: the class embedding (a row of the token table
        in DiGIT, hence scaled alike; the null class where ``drop``); with a prefix, ``labels`` are the (B, P) condition
        ids and the start slot is the one class (DiGIT stage 2's EOS)."""
        if self.prefix_len:
            if labels.shape[1:] != (self.prefix_len,) or labels.dtype.is_floating_point:
                raise ValueError(f"GPT with a prefix expects condition ids (B, {self.prefix_len}) int64 (the semantic "
                                 f"tokens), got {tuple(labels.shape)} {labels.dtype}")
            start = self.class_emb.weight[:1].expand(labels.shape[0], 1, -1)
            return self.embed_scale * torch.cat([self.prefix_emb(labels), start], dim=1)
        if drop is not None:
            labels = labels.masked_fill(drop, self.num_classes)
        return self.embed_scale * self.class_emb(labels)[:, None]

    def to_positions(self, seq: torch.Tensor) -> torch.Tensor:
        """(B, L, ...) in step order -> image position order."""
        return seq.index_select(1, self.inverse_order)

    # --- training / scoring -----------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor, labels: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, L) ids or (B, L, D), labels (B,) (with a prefix: (B, P) ids), drop (B,) bool -> z (B, L, cond_dim)
        in position order."""
        self.check_tokens(tokens)
        prev = self.embed_tokens(tokens.index_select(1, self.order[:-1]))  # inputs of slots 1..L-1
        x = torch.cat([self.condition(labels, drop).to(prev.dtype), prev], dim=1) + self.pos_emb
        x = self.embed_drop(x)
        for block in self.decoder_blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, True, use_reentrant=False)
            else:
                x = block(x, causal=True)
        return self.to_positions(self.norm(x[:, self.prefix_len:]))

    # --- cached decoding --------------------------------------------------------------------------
    def new_cache(self, batch: int, device: torch.device) -> KVCache:
        """Zeroed (k, v) per block, each (batch, heads, L, head_dim), in the dtype the blocks compute in (the
        autocast dtype when autocast is on). Zeros, not empty: a masked slot's weight is exactly 0, and 0 · NaN
        would not be."""
        device = torch.device(device)
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else self.pos_emb.dtype
        heads = self.decoder_blocks[0].attn.num_heads
        shape = (batch, heads, self.prefix_len + self.seq_len, self.cond_dim // heads)
        return [(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))
                for _ in self.decoder_blocks]

    def decode(self, prev: torch.Tensor | None, labels: torch.Tensor, slot: torch.Tensor, cache: KVCache,
               drop: torch.Tensor | None = None) -> torch.Tensor:
        """z (B, cond_dim) of step ``slot`` ((1,) int64 on the device), filling ``cache`` at that slot.

        ``prev`` is the token generated at the step before ((B,) ids or (B, D)); None at slot 0, whose input is
        the class (with a prefix: the prefix and the start slot, written to the cache in one pass). Equal to
        ``forward``'s row for position ``order[slot]`` given the same earlier tokens.
        """
        if prev is None:
            x, pos = self.condition(labels, drop), torch.arange(self.prefix_len + 1, device=slot.device)
        else:
            x, pos = self.embed_tokens(prev)[:, None], slot + self.prefix_len
        x = self.embed_drop(x + self.pos_emb.index_select(0, pos))
        for block, kv in zip(self.decoder_blocks, cache):
            x = block(x, cache=kv, pos=pos)
        return self.norm(x)[:, -1]
