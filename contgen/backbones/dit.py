"""DiT and SiT: class-conditional adaLN-Zero transformer denoisers over a latent grid.

DiT (Peebles & Xie 2023, facebookresearch/DiT ``models.py``) and SiT (Ma et al. 2024; the copy in UCGM
``networks/sit.py`` and REPA ``models/sit.py``) are the same network; they differ only in the time they are
fed and in what the output means, both of which the transport decides:

* DiT is a DDPM ε-model fed integer timesteps 0..999 (``time_scale=1000``: contgen feeds t = index / 1000), and
  the released weights learn the variance too (``learn_sigma=True`` doubles the output channels);
* SiT is a linear-interpolant velocity model fed the raw t in [0, 1] (``time_scale=1``, ``learn_sigma=False``).

The denoiser contract (shared with :mod:`contgen.backbones.tit`): ``net(x, t, y) -> F`` with ``F.shape ==
x.shape``; ``x`` (B, C, H, W), ``t`` (B,) float in the network's native time, ``y`` (B,) long in
``[0, num_classes]`` where ``y == num_classes`` is the null class (the last row of ``y_embedder``, as every
reference's ``LabelEmbedder`` with CFG). The network never drops labels itself: the objective does, by mask.
With ``learn_sigma`` the forward returns only the first C channels (the reference TiT/SiT do the same,
tit.py:502-503; DiT's released second half is the DDPM variance interpolation, unused by every transport
here); ``forward(..., full_output=True)`` returns all ``2C``.

Parameter names equal the references' (``x_embedder.proj``, ``t_embedder.mlp``, ``y_embedder.embedding_table``,
``pos_embed``, ``blocks.N.{attn.qkv, attn.proj, mlp.fc1, mlp.fc2, adaLN_modulation.1}``, ``final_layer.*``), so
their released state dicts load with the identity map (:mod:`contgen.utils.denoiser_ckpt`). ``pos_embed`` is a
frozen ``nn.Parameter`` as in the references: it is in the state dict and in the parameter counts they print.
Attention goes through ``F.scaled_dot_product_attention``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from contgen.nn.adaln import timestep_embedding
from contgen.nn.transformer import Attention

# Reference size presets (DiT models.py:328-363, SiT sit.py:389-470, TiT tit.py:593-640 use the same table).
SIZES = {
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
}


def modulate(x: torch.Tensor, shift: torch.Tensor | None, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x * (1 + scale) + shift, per sample (DiT models.py:19; TiT's shift-free variant when shift is None)."""
    x = x * (1 + scale.unsqueeze(1))
    return x if shift is None else x + shift.unsqueeze(1)


def sincos_pos_embed_2d(dim: int, grid: int) -> torch.Tensor:
    """(grid*grid, dim) fixed 2-D sin-cos embedding of MAE (pos_embed.py), as DiT/SiT/TiT use it.

    Tokens are row-major (row i, column j). MAE's meshgrid puts the *column* first, so the first half of the
    channels encodes j and the second half i; each half is [sin(p·ω) | cos(p·ω)], ω_k = 10000^(-k/(dim/4)).
    Computed in float64 and rounded once to float32, as the numpy reference does.
    """
    if dim % 4:
        raise ValueError(f"hidden_size must be divisible by 4 for the 2-D sin-cos embedding, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    pos = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(pos, pos, indexing="ij")

    def one(p: torch.Tensor) -> torch.Tensor:
        out = p.reshape(-1, 1) * omega
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([one(cols), one(rows)], dim=1).float()


class PatchEmbed(nn.Module):
    """p×p patches → tokens by a strided conv (timm ``PatchEmbed``: key ``proj``), row-major order."""

    def __init__(self, input_size: int, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        self.input_size, self.patch_size = input_size, patch_size
        self.grid = input_size // patch_size
        self.num_patches = self.grid**2
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """sinusoid(time_scale · t) (256 frequencies, max period 1e4, [cos | sin]) → Linear-SiLU-Linear
    (DiT models.py:27-64).

    ``time_scale`` maps the network's native time to the argument the reference fed its sinusoid: 1000 for
    DDPM models fed integer steps (DiT), 1 for the flow models fed t in [0, 1] (SiT, TiT). The product is taken
    in t's own dtype (a float64 t = step / 1000 gives the integer step back exactly), then rounded to float32.
    """

    def __init__(self, hidden_size: int, time_scale: float = 1.0, frequency_embedding_size: int = 256):
        super().__init__()
        self.time_scale = float(time_scale)
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        if self.time_scale != 1.0:
            t = t * self.time_scale
        freq = timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """num_classes + 1 rows; row ``num_classes`` is the null class for CFG (DiT models.py:67-98). No dropout here."""

    def __init__(self, num_classes: int, hidden_size: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(y)


class Mlp(nn.Module):
    """Linear → GELU(tanh) → Linear with timm ``Mlp`` names (DiT models.py:108-109)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """adaLN-Zero block: x + g1·Attn(mod(LN(x))), x + g2·MLP(mod(LN(x))); 6 vectors from c (DiT models.py:101-122)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """mod(norm(x)) → Linear to p·p·out_channels (DiT models.py:125-142; TiT passes its parameter-free RMSNorm)."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, norm: nn.Module | None = None):
        super().__init__()
        self.norm_final = norm if norm is not None else nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class LatentDenoiser(nn.Module):
    """What DiT, SiT and TiT share: embeddings, the conditioning vector, the block loop, unpatchify, the init.

    Subclasses set ``self.blocks`` and ``self.final_layer`` and call :meth:`initialize_weights`. Class
    conditioning exists when ``num_classes > 0`` (the references drop ``y_embedder`` for unconditional models).
    """

    def __init__(self, input_size: int, in_channels: int, num_classes: int, patch_size: int, hidden_size: int,
                 num_heads: int, learn_sigma: bool, time_scale: float, grad_checkpointing: bool):
        super().__init__()
        for key, value in (("input_size", input_size), ("in_channels", in_channels), ("patch_size", patch_size),
                           ("hidden_size", hidden_size), ("num_heads", num_heads)):
            if value < 1:
                raise ValueError(f"model.{key} must be >= 1, got {value}")
        if num_classes < 0:
            raise ValueError(f"model.num_classes must be >= 0 (0: unconditional), got {num_classes}")
        if hidden_size % num_heads:
            raise ValueError(f"model.hidden_size {hidden_size} is not divisible by model.num_heads {num_heads}")
        self.input_size, self.in_channels, self.num_classes = input_size, in_channels, num_classes
        self.patch_size, self.hidden_size, self.num_heads = patch_size, hidden_size, num_heads
        self.learn_sigma = learn_sigma
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.time_scale = float(time_scale)
        self.grad_checkpointing = grad_checkpointing
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size, time_scale)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size) if num_classes > 0 else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.x_embedder.num_patches, hidden_size), requires_grad=False)

    def initialize_weights(self) -> None:
        """The reference init (DiT models.py:182-216, identical in SiT/TiT): xavier-uniform linears with zero bias,
        the patch conv as a linear, N(0, 0.02) label table and time-MLP weights, sin-cos ``pos_embed``, and zeros
        for every adaLN output and the final linear (adaLN-Zero: a fresh network outputs exactly 0)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.pos_embed.data.copy_(sincos_pos_embed_2d(self.hidden_size, self.x_embedder.grid).unsqueeze(0))
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for layer in [b.adaLN_modulation[-1] for b in self.blocks] + [self.final_layer.adaLN_modulation[-1],
                                                                        self.final_layer.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def condition(self, t: torch.Tensor, y: torch.Tensor | None, batch: int) -> torch.Tensor:
        """c = t_embedder(t) + y_embedder(y), (B, hidden). A scalar or (B, 1, ...) t is accepted and flattened."""
        t = t.reshape(-1)
        if t.numel() == 1 and batch != 1:
            t = t.expand(batch)
        if t.shape[0] != batch:
            raise ValueError(f"t has {t.shape[0]} entries for a batch of {batch}")
        c = self.t_embedder(t)
        if self.y_embedder is not None:
            if y is None:
                raise ValueError("this denoiser is class-conditional: pass y (B,), with y == num_classes for the null "
                                 "class")
            c = c + self.y_embedder(y)
        return c

    def check_input(self, x: torch.Tensor) -> None:
        """Shape metadata only (no device reads)."""
        if x.ndim != 4 or x.shape[1] != self.in_channels or x.shape[2] != self.input_size \
                or x.shape[3] != self.input_size:
            raise ValueError(f"{type(self).__name__} expects x of shape (B, {self.in_channels}, {self.input_size}, "
                             f"{self.input_size}), got {tuple(x.shape)}")

    def unpatchify(self, x: torch.Tensor, channels: int) -> torch.Tensor:
        """(B, T, p·p·out_channels) → (B, channels, H, W), keeping the first ``channels`` of each patch's
        (p, p, c) layout (DiT models.py:218-231)."""
        b, g, p = x.shape[0], self.x_embedder.grid, self.patch_size
        x = x.reshape(b, g, g, p, p, self.out_channels)[..., :channels]
        return x.permute(0, 5, 1, 3, 2, 4).reshape(b, channels, g * p, g * p)

    def run_blocks(self, x: torch.Tensor, c: torch.Tensor, **kwargs) -> torch.Tensor:
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, c, use_reentrant=False, **kwargs)
            else:
                x = block(x, c, **kwargs)
        return x

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                full_output: bool = False) -> torch.Tensor:
        """F = net(x, t, y), shape of x; ``full_output`` returns all ``out_channels`` (2C with ``learn_sigma``)."""
        self.check_input(x)
        c = self.condition(t, y, x.shape[0])
        h = self.x_embedder(x) + self.pos_embed
        h = self.final_layer(self.run_blocks(h, c), c)
        return self.unpatchify(h, self.out_channels if full_output else self.in_channels)

    @property
    def num_tokens(self) -> int:
        return self.x_embedder.num_patches


class DiT(LatentDenoiser):
    """DiT (facebookresearch/DiT models.py:145-270): LayerNorm adaLN-Zero blocks, GELU(tanh) MLP, fixed sin-cos
    positions. Defaults are the released DiT's: ε- and variance-prediction (``learn_sigma``) at DDPM time
    (``time_scale=1000``; feed t = step / 1000 to reproduce the reference's ``model(x, step, y)``)."""

    def __init__(self, input_size: int, in_channels: int, num_classes: int, *, patch_size: int = 2,
                 hidden_size: int = 1152, depth: int = 28, num_heads: int = 16, mlp_ratio: float = 4.0,
                 learn_sigma: bool = True, time_scale: float = 1000.0, grad_checkpointing: bool = False):
        super().__init__(input_size, in_channels, num_classes, patch_size, hidden_size, num_heads, learn_sigma,
                         time_scale, grad_checkpointing)
        if depth < 1:
            raise ValueError(f"model.depth must be >= 1, got {depth}")
        self.depth = depth
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()


class SiT(DiT):
    """SiT (UCGM networks/sit.py = REPA models/sit.py without its projector heads): the DiT network fed the
    linear interpolant's t in [0, 1] directly (``time_scale=1``) and predicting C channels (no ``learn_sigma``)."""

    def __init__(self, input_size: int, in_channels: int, num_classes: int, *, patch_size: int = 2,
                 hidden_size: int = 1152, depth: int = 28, num_heads: int = 16, mlp_ratio: float = 4.0,
                 learn_sigma: bool = False, time_scale: float = 1.0, grad_checkpointing: bool = False):
        super().__init__(input_size, in_channels, num_classes, patch_size=patch_size, hidden_size=hidden_size,
                         depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, learn_sigma=learn_sigma,
                         time_scale=time_scale, grad_checkpointing=grad_checkpointing)


class ShortcutDiT(SiT):
    """The DiT of Shortcut models (Frans et al. 2025; kvfrans/shortcut-models ``model.py``): a velocity model
    ``net(x, t, y, level)`` conditioned on the step size as well as the time, c = t_emb(t) + y_emb(y) + dt_emb(level)
    (model.py:261-264) with two separate timestep embedders. Its time is the reference's own: t in [0, 1] with
    0 = noise, fed unscaled (model.py:83 is commented out; ``time_scale`` is the optional t-scale knob), and its step
    size the integer level log2(1/d) in 0..log2(denoise_timesteps) (the reference's ``dt_base``), embedded like a
    time. :class:`contgen.transport.shortcut.ShortcutObjective` converts to contgen's time (t = 1 is noise).

    ``reference_faithful`` (the presets' setting) keeps the reference's block details where they differ from
    facebookresearch DiT: attention logits scaled by 1/head_dim, not 1/sqrt(head_dim) (model.py:181); the blocks'
    adaLN projections Xavier-initialised, not zero (model.py:168; only the final layer starts at zero), and q, k, v
    initialised as three separate Xavier matrices (model.py:172-174). The rest is already the reference's in
    :class:`DiTBlock`: non-affine LayerNorm (eps 1e-6, Flax's default), GELU with the tanh approximation (Flax's
    default) and ``modulate`` without the scale clipping of math_utils.py (model.py:144 shadows it).
    Released Flax checkpoints load through :func:`contgen.utils.flax_ckpt.read_shortcut_checkpoint`.
    """

    def __init__(self, input_size: int, in_channels: int, num_classes: int, *, patch_size: int = 2,
                 hidden_size: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 time_scale: float = 1.0, reference_faithful: bool = True, grad_checkpointing: bool = False):
        super().__init__(input_size, in_channels, num_classes, patch_size=patch_size, hidden_size=hidden_size,
                         depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, learn_sigma=False,
                         time_scale=time_scale, grad_checkpointing=grad_checkpointing)
        self.reference_faithful = reference_faithful
        self.dt_embedder = TimestepEmbedder(hidden_size, time_scale=1.0)
        nn.init.normal_(self.dt_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.dt_embedder.mlp[2].weight, std=0.02)
        nn.init.zeros_(self.dt_embedder.mlp[0].bias)
        nn.init.zeros_(self.dt_embedder.mlp[2].bias)
        if reference_faithful:
            for block in self.blocks:
                block.attn.scale = 1.0 / (hidden_size // num_heads)
                nn.init.xavier_uniform_(block.adaLN_modulation[-1].weight)
                for w in block.attn.qkv.weight.data.chunk(3, dim=0):
                    nn.init.xavier_uniform_(w)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                level: torch.Tensor | None = None, full_output: bool = False) -> torch.Tensor:
        """v = net(x, t, y, level): t (B,) in [0, 1] with 0 = noise, level (B,) the integer log2(1/d)."""
        if level is None:
            raise ValueError("a Shortcut denoiser needs the step level (log2 of the number of steps): sample it with "
                             "sampler=shortcut")
        self.check_input(x)
        c = self.condition(t, y, x.shape[0]) + self.dt_embedder(level.reshape(-1).expand(x.shape[0]))
        h = self.x_embedder(x) + self.pos_embed
        h = self.final_layer(self.run_blocks(h, c), c)
        return self.unpatchify(h, self.in_channels)


def count_parameters(net: nn.Module) -> int:
    """All parameters, frozen ``pos_embed`` included: the number the reference training scripts print."""
    return sum(p.numel() for p in net.parameters())


__all__ = ["DiT", "SiT", "ShortcutDiT", "LatentDenoiser", "SIZES", "count_parameters", "sincos_pos_embed_2d"]
