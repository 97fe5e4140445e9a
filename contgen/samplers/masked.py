"""The masked random-order sampling loop of MAR (Li et al. 2024, Sec. 3.4; mar.py:262-329), shared by EAR.

Each of ``num_iter`` steps runs the backbone on the current tokens, then asks the head for the tokens
scheduled at this step. Everything that decides a shape (the cosine schedule, the CFG scale per step)
is computed on the host before the loop, so no step reads a device value back. Tokens are (B, L, token_dim), or
(B, L) int64 ids when the backbone has ``vocab_size`` (a discrete tokenizer; the head samples ids, e.g.
``loss=categorical``).
"""

from __future__ import annotations

import torch

from contgen.samplers.schedules import cfg_schedule, cosine_mask_schedule, random_orders


def gather_rows(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x (B, L, C) at positions (B, n) → (B·n, C), rows grouped by sample; token ids x (B, L) → (B·n,)."""
    if x.ndim == 2:
        return x.gather(1, positions).reshape(-1)
    return x.gather(1, positions[..., None].expand(-1, -1, x.shape[-1])).reshape(-1, x.shape[-1])


class MaskedARSampler:
    """Generate all tokens in ``num_iter`` steps, most of them late (cosine schedule), random order per image.

    ``cfg`` != 1 doubles the batch with the null class (label dropped) and guides every step with the scale
    given by ``cfg_schedule`` (``linear``: 1 → cfg as tokens are generated; ``constant``); the head applies it.
    ``temperature`` is passed to the head (diffusion: noise scale per step; energy: infer_temperature).
    """

    def __init__(self, num_iter: int = 64, cfg: float = 1.0, cfg_schedule: str = "linear", temperature: float = 1.0):
        if cfg_schedule not in ("linear", "constant"):
            raise ValueError(f"sampler.cfg_schedule must be 'linear' or 'constant', got {cfg_schedule!r}")
        for key, value in (("num_iter", num_iter), ("cfg", cfg), ("temperature", temperature)):
            if value < (1 if key == "num_iter" else 0):
                raise ValueError(f"sampler.{key} must be >= {1 if key == 'num_iter' else 0}, got {value}")
        self.num_iter, self.cfg, self.cfg_schedule, self.temperature = num_iter, cfg, cfg_schedule, temperature

    @torch.no_grad()
    def __call__(self, backbone, head, labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        b, seq_len, device = labels.shape[0], backbone.seq_len, labels.device
        schedule = cosine_mask_schedule(seq_len, self.num_iter)
        order = random_orders(b, seq_len, generator, device)
        ids = bool(getattr(backbone, "vocab_size", None))  # a discrete tokenizer's ids: (B, L) int64
        shape = (b, seq_len) if ids else (b, seq_len, backbone.token_dim)
        tokens = torch.zeros(shape, dtype=torch.long if ids else torch.get_default_dtype(), device=device)
        guided = self.cfg != 1.0
        drop = torch.zeros(b, dtype=torch.bool, device=device)
        if guided:  # second half of the batch: the null class
            labels, drop = labels.repeat(2), torch.cat([drop, ~drop])
        masked = seq_len
        for next_masked in schedule:
            x, o = (tokens.repeat(2, *[1] * (tokens.ndim - 1)), order.repeat(2, 1)) if guided else (tokens, order)
            z = backbone(x, labels, o, masked, drop)
            positions = order[:, next_masked:masked]  # predicted at this step
            scale = cfg_schedule(self.cfg, self.cfg_schedule, seq_len, next_masked) if guided else None
            rows = torch.cat([gather_rows(z[:b], positions), gather_rows(z[b:], positions)]) if guided else gather_rows(z, positions)
            new = head.sample(rows, temperature=self.temperature, cfg=scale, generator=generator)
            new = new.view(b, *positions.shape[1:], *tokens.shape[2:]).to(tokens.dtype)  # (B, n) ids or (B, n, D)
            tokens = tokens.scatter(1, positions.view(*positions.shape, *[1] * (tokens.ndim - 2)).expand_as(new), new)
            masked = next_masked
        return tokens
