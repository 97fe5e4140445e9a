"""A small smooth class-conditional denoiser for the solver tests and the UCGM sampling fixtures.

It follows the denoiser contract (``net(x, t, y) -> F`` with F.shape == x.shape, t (B,) in the network's native
time, y (B,) long with ``y == num_classes`` the null class) on any shape (B, C, ...) : a per-position MLP on
[x's channels, sin/cos features of t, a class embedding] plus a global term (mean over positions), so every
output depends on x, t, y and on the other positions. ``in_channels`` is what the reference's
``forward_with_cfg`` reads. Used both by ``tests/fixtures/make_ucgm_sampling_fixtures.py`` (in the reference's
sampler) and by the tests (in contgen's), with the weights stored in the fixture.
"""

from __future__ import annotations

import torch
from torch import nn


class ToyDenoiser(nn.Module):
    def __init__(self, channels: int = 3, num_classes: int = 4, hidden: int = 32):
        super().__init__()
        self.in_channels = channels
        self.num_classes = num_classes
        self.inp = nn.Linear(channels, hidden)
        self.mix = nn.Linear(channels, hidden)
        self.tproj = nn.Linear(8, hidden)
        self.emb = nn.Embedding(num_classes + 1, hidden)
        self.out = nn.Linear(hidden, channels)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[0], x.shape[1]
        h = x.movedim(1, -1)  # (B, ..., C)
        t = t.to(x.dtype)
        freqs = torch.arange(1, 5, dtype=x.dtype, device=x.device) * 3.0
        tf = torch.cat([torch.sin(t[:, None] * freqs), torch.cos(t[:, None] * freqs)], dim=-1)
        cond = self.tproj(tf) + self.emb(y) + self.mix(h.reshape(b, -1, c).mean(dim=1))
        cond = cond.reshape(b, *([1] * (h.ndim - 2)), cond.shape[-1])
        return self.out(torch.tanh(self.inp(h) + cond)).movedim(-1, 1)
