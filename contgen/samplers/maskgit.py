"""MaskGIT's confidence-ordered parallel decoding of discrete tokens (Chang et al. 2022, Sec. 3.2), as DiGIT's
MaskGIT pixel decoder runs it (``image_generation_stage2/model_nar.py:388-463``; reference/digit.md §3).

Start with every token masked. At step k of K (ratio r = (k+1)/K): run the bidirectional backbone, draw an id for
every masked position (softmax(logits / temperature), within the head's top-k / top-p if set), score each drawn id
by its log-probability plus Gumbel noise scaled by ``choice_temperature · (1 − r)``, and re-mask the
⌊L·cos(πr/2)⌋ least confident of the positions drawn this step (clamped to [1, masked − 1]; none after the last
step) — the counts are :func:`cosine_mask_schedule`'s. Tokens kept once stay (their confidence is +∞ in DiGIT).
DiGIT: 8 steps, temperature 1, choice temperature 4.5.

The positions still masked go first in each row's order, so the masked backbone API ``(tokens, cond, order,
num_masked)`` applies as in MAR's sampler, with a static ``num_masked`` per step. Deviation: DiGIT draws the Gumbel
noise with numpy's global generator on the host; here it comes from the sampling generator on the device.
"""

from __future__ import annotations

import torch

from contgen.heads.categorical import filter_logits, gumbel, gumbel_argmax
from contgen.samplers.masked import gather_rows
from contgen.samplers.schedules import cosine_mask_schedule


class MaskGITSampler:
    """No guidance: DiGIT's pixel decoder has no null condition."""

    def __init__(self, num_iter: int = 8, temperature: float = 1.0, choice_temperature: float = 4.5):
        if num_iter < 1:
            raise ValueError(f"sampler.num_iter must be >= 1, got {num_iter}")
        for key, value in (("temperature", temperature), ("choice_temperature", choice_temperature)):
            if value < 0:
                raise ValueError(f"sampler.{key} must be >= 0, got {value}")
        self.num_iter, self.temperature, self.choice_temperature = num_iter, temperature, choice_temperature

    @torch.no_grad()
    def __call__(self, backbone, head, cond: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, L) ids; ``cond`` is what the backbone is conditioned on (class labels or a prefix of ids)."""
        if not getattr(head, "discrete", False) or not getattr(backbone, "vocab_size", None):
            raise ValueError("sampler=maskgit draws discrete ids by confidence: it needs loss=categorical over a "
                             "discrete tokenizer (use sampler=mar for continuous tokens)")
        b, seq_len, device = cond.shape[0], backbone.seq_len, cond.device
        tokens = torch.zeros(b, seq_len, dtype=torch.long, device=device)
        order = torch.arange(seq_len, device=device).expand(b, -1)  # masked first: all of them
        masked = seq_len
        for k, next_masked in enumerate(cosine_mask_schedule(seq_len, self.num_iter)):
            z = backbone(tokens, cond, order, masked)
            positions = order[:, :masked]
            logits = head.guided_logits(gather_rows(z, positions))
            if self.temperature == 0:
                ids = logits.argmax(-1)
            else:  # the head's top-k / top-p apply to the draw (DiGIT: neither); the confidence sees the full softmax
                ids = gumbel_argmax(filter_logits(logits / self.temperature, head.top_k, head.top_p), generator)
            tokens = tokens.scatter(1, positions, ids.view(b, masked))
            if next_masked:
                logp = logits.log_softmax(-1).gather(1, ids[:, None]).view(b, masked)
                noise = self.choice_temperature * (1 - (k + 1) / self.num_iter)
                confidence = logp + noise * gumbel(logp.shape, generator, device)
                keep = confidence.argsort(dim=1)  # least confident first: they are masked again
                order = torch.cat([positions.gather(1, keep), order[:, masked:]], dim=1)
            masked = next_masked
        return tokens
