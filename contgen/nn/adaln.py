"""The AdaLN residual MLP trunk shared by the per-token heads.

MAR's diffusion head (Li et al. 2024, Sec. 3.3; ``SimpleMLPAdaLN``) and EAR's energy-score generator
(Shao et al. 2025, Sec. 4) are the same network with the roles of its two inputs swapped:

* diffusion: residual stream = ``input_proj(x_t)``, modulation = ``time_embed(t) + cond_embed(z)``;
* energy:    residual stream = ``input_proj(z)``,   modulation = ``noise_embed(u)``.

``AdaLNMLP`` holds what both share — ``input_proj``, ``res_blocks`` and ``final_layer`` with the
reference parameter names — and each head adds its own embedders. Every adaLN output and the final
linear start at zero, so a fresh head outputs exactly 0.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, GLIDE/DiT layout: [cos | sin]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    """LN → modulate(shift, scale) → Linear-SiLU-Linear → gated residual (shift, scale, gate from y)."""

    def __init__(self, width: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x: torch.Tensor, y: torch.Tensor, shift_scale: float = 1.0) -> torch.Tensor:
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        if shift_scale != 1.0:  # EAR's infer_temperature: scales only the shift (scoreloss.py:80-83)
            shift = shift * shift_scale
        return x + gate * self.mlp(modulate(self.in_ln(x), shift, scale))


class FinalLayer(nn.Module):
    def __init__(self, width: int, out_dim: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class AdaLNMLP(nn.Module):
    """Residual MLP of ``depth`` AdaLN blocks of ``width``; subclasses define the embedders."""

    def __init__(self, in_dim: int, width: int, depth: int, out_dim: int, grad_checkpointing: bool = False):
        super().__init__()
        self.input_proj = nn.Linear(in_dim, width)
        self.res_blocks = nn.ModuleList([ResBlock(width) for _ in range(depth)])
        self.final_layer = FinalLayer(width, out_dim)
        self.grad_checkpointing = grad_checkpointing

    def init_weights(self) -> None:
        """Xavier-uniform linears, zero biases; zero adaLN and output layers (MAR diffloss.py:194-215)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for block in self.res_blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def trunk(self, x: torch.Tensor, y: torch.Tensor, shift_scale: float = 1.0) -> torch.Tensor:
        """Run the residual stream ``x`` (already projected) through the blocks, modulated by ``y``."""
        for block in self.res_blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, y, shift_scale, use_reentrant=False)
            else:
                x = block(x, y, shift_scale)
        return self.final_layer(x, y)
