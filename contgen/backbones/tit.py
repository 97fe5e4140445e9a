"""TiT, UCGM's "efficient DiT" denoiser (Sun et al. 2025; UCGM ``networks/tit.py``).

DiT's adaLN-Zero transformer with four changes (tit.py:1-12), each a flag with the reference's default:

* ``use_rmsnorm``: parameter-free RMSNorm (eps 1e-6, computed in float32) for the block and final norms;
* ``use_qknorm``: the same RMSNorm on each head's queries and keys (a LayerNorm with affine when
  ``use_rmsnorm`` is off, as timm's default ``norm_layer``);
* ``use_swiglu``: a SwiGLU MLP ``w3(silu(a) * b)`` with ``(a, b) = w12(x)`` and hidden width
  ``int(2/3 · int(hidden · mlp_ratio))`` (3072 at XL), replacing the GELU MLP;
* ``use_rope``: EVA-02's 2-D rotary embedding on q and k (``VisionRotaryEmbeddingFast``, pos_embed.py:96-135):
  half of each head's channels rotate with the token's row, the other half with its column, frequencies
  10000^(-2k/(head_dim/2)), adjacent channel pairs rotated together. It is added on top of the fixed sin-cos
  ``pos_embed``, which TiT keeps.

``compile_blocks`` (default on): on CUDA each block runs through one ``torch.compile``d function shared by every
block and every copy of the network (teacher, EMA), as the reference compiles its ``TiTBlock.forward``
(tit.py:287, ``@torch.compile``); elsewhere (CPU, meta) and inside an outer compile the blocks run eagerly. Eager
TiT-XL/2 on an H100 samples 1.7× (fp32) to 2.7× (bf16) slower than the compiled reference and its training step at
batch 128 does not fit in 80 GB (bench/ucgm.py, 2026-11-26): the fp32 residual stream's element-wise work
(RMSNorm, modulation, RoPE, SwiGLU gating) dominates unless fused. It is a class-level function, not
``Module.compile``, because a deep copy of a ``Module.compile``d module calls the original's compiled
``_call_impl``, i.e. the original's weights.

``wo_shift`` drops the adaLN shifts (4 modulation vectors per block instead of 6). Time is the raw t fed to
the sinusoid (``time_scale=1``), as UCGM feeds its transports' native time. The contract and parameter names are
those of :mod:`contgen.backbones.dit`; the rotary tables are persistent buffers ``feat_rope.freqs_cos`` /
``feat_rope.freqs_sin`` because the reference's state dicts hold them (so its files load with the identity map).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from contgen.backbones.dit import FinalLayer, LatentDenoiser, Mlp, modulate

# tit.py:593-640; TiT-L uses 16 heads (head_dim 64) like DiT-L.
SIZES = {
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
    "1p0B": dict(depth=24, hidden_size=1536, num_heads=24),
    "1p6B": dict(depth=28, hidden_size=1792, num_heads=28),
}


class RMSNorm(nn.Module):
    """Parameter-free RMSNorm over the last dim, in float32, cast back (tit.py:29-51)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.dim, self.eps = dim, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Adjacent pairs (x0, x1) → (-x1, x0) (pos_embed.py:38-42)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


class VisionRotaryEmbedding(nn.Module):
    """2-D RoPE tables for a ``grid × grid`` token map, (grid², head_dim): EVA-02's ``VisionRotaryEmbeddingFast``
    with ``dim = head_dim / 2`` and language-model frequencies (pos_embed.py:96-135)."""

    def __init__(self, head_dim: int, grid: int, theta: float = 10000.0):
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"2-D RoPE needs head_dim divisible by 4, got {head_dim}")
        dim = head_dim // 2
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
        pos = torch.arange(grid) / grid * grid  # the reference's (ft_seq_len / pt_seq_len) rescale, same rounding
        f = (pos[:, None] * freqs[None]).repeat_interleave(2, dim=-1)  # (grid, dim), pairs share a frequency
        f = torch.cat([f[:, None, :].expand(grid, grid, dim), f[None, :, :].expand(grid, grid, dim)], dim=-1)
        self.register_buffer("freqs_cos", f.cos().reshape(grid * grid, head_dim))
        self.register_buffer("freqs_sin", f.sin().reshape(grid * grid, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate (B, heads, N, head_dim); computed in the promoted dtype (float32 tables) and cast back."""
        return (x * self.freqs_cos + rotate_half(x) * self.freqs_sin).to(x.dtype)


class TiTAttention(nn.Module):
    """qkv → per-head q/k norm → RoPE → SDPA → proj (tit.py:60-127); keys qkv, q_norm, k_norm, proj."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, use_rmsnorm: bool):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        if qk_norm:
            norm = (lambda: RMSNorm(self.head_dim)) if use_rmsnorm else (lambda: nn.LayerNorm(self.head_dim))
            self.q_norm, self.k_norm = norm(), norm()
        else:
            self.q_norm = self.k_norm = nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: VisionRotaryEmbedding | None = None) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = rope(q), rope(k)
        x = F.scaled_dot_product_attention(q.to(v.dtype), k.to(v.dtype), v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class SwiGLUFFN(nn.Module):
    """w3(silu(a) · b), (a, b) = w12(x).chunk(2) (swiglu_ffn.py:15-36)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


def _block_forward(block: "TiTBlock", x: torch.Tensor, c: torch.Tensor,
                   rope: VisionRotaryEmbedding | None) -> torch.Tensor:
    if block.wo_shift:
        scale1, gate1, scale2, gate2 = block.adaLN_modulation(c).chunk(4, dim=-1)
        shift1 = shift2 = None
    else:
        shift1, scale1, gate1, shift2, scale2, gate2 = block.adaLN_modulation(c).chunk(6, dim=-1)
    x = x + gate1.unsqueeze(1) * block.attn(modulate(block.norm1(x), shift1, scale1), rope)
    return x + gate2.unsqueeze(1) * block.mlp(modulate(block.norm2(x), shift2, scale2))


_COMPILED: dict = {}


def _compiled_block_forward():
    """``torch.compile(_block_forward)``, made once per process (compiling happens at the first call of each
    grad mode / autocast state / dtype / shape; one graph serves all blocks, their parameters are inputs)."""
    if "fn" not in _COMPILED:
        _COMPILED["fn"] = torch.compile(_block_forward)
    return _COMPILED["fn"]


class TiTBlock(nn.Module):
    """adaLN-Zero block with RMSNorm / QK-norm / SwiGLU / RoPE (tit.py:222-306)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, use_qknorm: bool, use_swiglu: bool,
                 use_rmsnorm: bool, wo_shift: bool, compile_block: bool = False):
        super().__init__()
        self.compile_block = compile_block
        norm = (lambda: RMSNorm(hidden_size)) if use_rmsnorm else \
            (lambda: nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6))
        self.norm1 = norm()
        self.attn = TiTAttention(hidden_size, num_heads, use_qknorm, use_rmsnorm)
        self.norm2 = norm()
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.mlp = SwiGLUFFN(hidden_size, int(2 / 3 * mlp_hidden)) if use_swiglu else Mlp(hidden_size, mlp_hidden)
        self.wo_shift = wo_shift
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, (4 if wo_shift else 6) * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: VisionRotaryEmbedding | None = None) -> torch.Tensor:
        if self.compile_block and x.is_cuda and not torch.compiler.is_compiling():
            return _compiled_block_forward()(self, x, c, rope)
        return _block_forward(self, x, c, rope)


class TiT(LatentDenoiser):
    """TiT (tit.py:337-504). Constructor fields beyond the shared ones mirror the reference's flags; defaults are
    the reference's (every published TiT run uses them). ``learn_sigma`` exists for layout compatibility only.
    ``compile_blocks``: compile the block function on CUDA (module docstring); False runs every block eagerly."""

    def __init__(self, input_size: int, in_channels: int, num_classes: int, *, patch_size: int = 2,
                 hidden_size: int = 1152, depth: int = 28, num_heads: int = 16, mlp_ratio: float = 4.0,
                 learn_sigma: bool = False, time_scale: float = 1.0, use_qknorm: bool = True,
                 use_swiglu: bool = True, use_rope: bool = True, use_rmsnorm: bool = True, wo_shift: bool = False,
                 grad_checkpointing: bool = False, compile_blocks: bool = True):
        super().__init__(input_size, in_channels, num_classes, patch_size, hidden_size, num_heads, learn_sigma,
                         time_scale, grad_checkpointing)
        if depth < 1:
            raise ValueError(f"model.depth must be >= 1, got {depth}")
        if num_classes < 2:  # tit.py:377: TiT has no label embedder below two classes
            self.y_embedder = None
        self.depth = depth
        self.use_rope = use_rope
        self.feat_rope = VisionRotaryEmbedding(hidden_size // num_heads, self.x_embedder.grid) if use_rope else None
        self.blocks = nn.ModuleList([
            TiTBlock(hidden_size, num_heads, mlp_ratio, use_qknorm, use_swiglu, use_rmsnorm, wo_shift,
                     compile_block=compile_blocks)
            for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels,
                                      norm=RMSNorm(hidden_size) if use_rmsnorm else None)
        self.initialize_weights()

    @property
    def compile_blocks(self) -> bool:
        return all(b.compile_block for b in self.blocks)

    @compile_blocks.setter
    def compile_blocks(self, on: bool) -> None:
        for b in self.blocks:
            b.compile_block = bool(on)

    def run_blocks(self, x: torch.Tensor, c: torch.Tensor, **kwargs) -> torch.Tensor:
        return super().run_blocks(x, c, rope=self.feat_rope)


__all__ = ["TiT", "SIZES", "RMSNorm", "VisionRotaryEmbedding"]
