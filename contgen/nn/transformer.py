"""Pre-norm ViT block with the parameter names of timm's ``vision_transformer.Block``.

MAR and EAR build on timm's ``Block`` (qkv bias, LayerNorm eps 1e-6, GELU MLP). Keeping its parameter
names (``norm1``, ``attn.qkv``, ``attn.proj``, ``norm2``, ``mlp.fc1``, ``mlp.fc2``) lets released
reference checkpoints load without renaming, while attention goes through
``F.scaled_dot_product_attention`` (flash / memory-efficient kernels on GPU).

The causal GPT (``contgen/backbones/gpt.py``) uses the same block with a causal mask, optionally post-norm
(fairseq's ``TransformerDecoderLayer`` with ``normalize_before=False``), and a preallocated key/value cache for
decoding one slot at a time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """Multi-head self-attention; ``scale`` of q·k defaults to 1/sqrt(head_dim) (Shortcut's DiT uses 1/head_dim)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 scale: float | None = None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.scale = num_heads, scale
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, causal: bool = False, cache: tuple[torch.Tensor, torch.Tensor] | None = None,
                pos: torch.Tensor | None = None, keys: torch.Tensor | None = None) -> torch.Tensor:
        """``keys`` (S,) bool: the slots that may be attended to (padding excluded); ``causal``: token i attends to
        tokens <= i. ``cache`` = (k, v), each (B, heads, S, head_dim), preallocated
        and zero-filled: x holds the sequence slots ``pos`` (n,) (a device tensor: no host value, fixed shapes); their
        keys/values are written in place and x attends causally to every slot <= its own (the cache implies causal)."""
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        mask = None if keys is None else keys[None]  # (1, S): every query alike
        if cache is not None:
            k_cache, v_cache = cache
            k, v = k_cache.index_copy_(2, pos, k), v_cache.index_copy_(2, pos, v)
            mask = torch.arange(k.shape[2], device=x.device) <= pos[:, None]  # (n, S)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.attn_drop if self.training else 0.0,
                                           is_causal=causal and cache is None, scale=self.scale)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, c)))


class Mlp(nn.Module):
    """fc1 → GELU → dropout ``act_drop`` → fc2 → dropout ``drop``; timm drops ``drop`` at both places (the default),
    fairseq has ``activation_dropout`` 0 after the activation and ``dropout`` after fc2."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0, act_drop: float | None = None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.act_drop = nn.Dropout(drop if act_drop is None else act_drop)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.act_drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """x + Attn(LN(x)); x + MLP(LN(x)) — timm ``Block`` with ``proj_drop`` applied after attention and MLP.

    ``norm_first=False`` is the post-norm layer of fairseq's ``TransformerDecoderLayer`` (``normalize_before``
    False): x = LN(x + Attn(x)); x = LN(x + MLP(x)). ``causal`` / ``cache`` / ``pos`` / ``keys``: see :class:`Attention`.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, norm_first: bool = True, norm_eps: float = 1e-6,
                 act_drop: float | None = None):
        super().__init__()
        self.norm_first = norm_first
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_drop, proj_drop)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), proj_drop, act_drop)

    def forward(self, x: torch.Tensor, causal: bool = False, cache: tuple[torch.Tensor, torch.Tensor] | None = None,
                pos: torch.Tensor | None = None, keys: torch.Tensor | None = None) -> torch.Tensor:
        if not self.norm_first:
            x = self.norm1(x + self.attn(x, causal, cache, pos, keys))
            return self.norm2(x + self.mlp(x))
        x = x + self.attn(self.norm1(x), causal, cache, pos, keys)
        return x + self.mlp(self.norm2(x))
