"""``CausalARModule``: the token-AR family in a fixed order, one token per step (a GPT; DiGIT stage 1).

Everything but the step is ``TokenARModule``'s (optimizer, EMA, generators, checkpoints, ``generate``): the
training step predicts every position — z of position p sees the class (dropped to the null class with
``label_drop_prob``) and the tokens before p in the backbone's order — and the head's loss is taken over all rows;
the sampler is :class:`~contgen.samplers.causal.CausalARSampler` (KV cache, one token per step).
"""

from __future__ import annotations

import torch

from contgen.modules.token_ar import TokenARModule
from contgen.samplers.causal import CausalARSampler


class CausalARModule(TokenARModule):
    causal = True

    def check_sampler(self, sampler) -> None:
        if not isinstance(sampler, CausalARSampler):
            raise ValueError(f"module=causal_ar samples one token per step: use sampler=causal, got "
                             f"{type(sampler).__name__}")

    def masked_loss(self, tokens: torch.Tensor, labels: torch.Tensor, g: torch.Generator, g_cpu: torch.Generator):
        """The head's loss on every row (causally, every position is a masked one); ``g_cpu`` is unused (no mask
        ratio to draw)."""
        backbone, head = self.net.backbone, self.net.head
        drop = torch.rand(tokens.shape[0], generator=g, device=tokens.device) < backbone.label_drop_prob
        z = backbone(tokens, labels, drop)
        return head.loss(tokens.flatten(0, 1), z.flatten(0, 1), generator=g)
