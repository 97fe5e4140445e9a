"""The causal (raster / fixed-order) sampling loop: one token per step with a key/value cache (GPT, DiGIT stage 1).

Step i runs the backbone on one slot — the class at slot 0, the token drawn at step i - 1 after that — and asks the
head for the token at step i. The cache is preallocated and the slot index is a device tensor, so every step has
the same shapes and reads nothing back to the host.
"""

from __future__ import annotations

import torch


class CausalARSampler:
    """Generate the ``seq_len`` tokens one at a time in the backbone's order.

    ``cfg`` != 1 doubles the batch with the null class (both halves are fed the same drawn tokens) and the head
    guides with that constant scale (categorical: on the logits; diffusion: on ε; ...). DiGIT samples without CFG.
    ``temperature`` is the head's knob (categorical: logits / temperature, 0 = argmax).
    """

    def __init__(self, cfg: float = 1.0, temperature: float = 1.0):
        for key, value in (("cfg", cfg), ("temperature", temperature)):
            if value < 0:
                raise ValueError(f"sampler.{key} must be >= 0, got {value}")
        self.cfg, self.temperature = cfg, temperature

    @torch.no_grad()
    def __call__(self, backbone, head, labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Tokens in image position order: (B, L) ids or (B, L, D)."""
        b, device = labels.shape[0], labels.device
        guided = self.cfg != 1.0
        drop = torch.zeros(b, dtype=torch.bool, device=device)
        if guided:  # second half of the batch: the null class
            labels, drop = labels.repeat(2), torch.cat([drop, ~drop])
        cache = backbone.new_cache(labels.shape[0], device)
        slots = torch.arange(backbone.seq_len, device=device)
        steps, prev = [], None
        for i in range(backbone.seq_len):
            z = backbone.decode(prev, labels, slots[i:i + 1], cache, drop)
            new = head.sample(z, temperature=self.temperature, cfg=self.cfg if guided else None, generator=generator)
            steps.append(new)
            prev = torch.cat([new, new]) if guided else new
        return backbone.to_positions(torch.stack(steps, dim=1))
