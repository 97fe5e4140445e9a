"""Categorical head: the distribution of one discrete token (an id in [0, vocab_size)) given z.

DiGIT's output layer and loss (reference/digit.md §2): an untied, bias-free projection to the vocabulary (fairseq's
``output_projection``, init N(0, d^-1/2)), trained with label-smoothed cross-entropy, ε = 0.1 spread uniformly over
the full vocabulary — fairseq's ``LabelSmoothedDualImitationCriterion._compute_loss`` (DiGIT ``criterion.py:31-37``):

    loss = (1 - ε) · mean_rows(-log p[target]) - ε · mean_rows,vocab(log p)

which is also ``F.cross_entropy(..., label_smoothing=ε)``. DiGIT's vocabulary has 5 fairseq specials besides the K
cluster ids (they get ε/(K+5) each); contgen's has the K ids only.

Sampling (``fairseq-generate --sampling``, digit.md §2): logits / temperature, then top-k (DiGIT-B 200, -L 400),
then top-p (fairseq's rule: keep the most likely ids up to and including the one that reaches mass p), then a
Gumbel-max draw from the generator (no ``multinomial``, no host sync). temperature 0 = argmax. Optional CFG on the
logits, l_u + cfg·(l_c − l_u) — not in DiGIT, which has no CFG.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """``logits`` (N, V) with -inf outside the top-k and the top-p nucleus (0 / 1.0 = off); always keeps the argmax."""
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        probs, idx = logits.softmax(-1).sort(dim=-1, descending=True)
        drop_sorted = probs.cumsum(-1) - probs >= top_p  # mass before this id already reaches p (fairseq _sample_topp)
        logits = logits.masked_fill(drop_sorted.scatter(-1, idx, drop_sorted), float("-inf"))
    return logits


class CategoricalHead(nn.Module):
    """The head contract of :mod:`contgen.heads` for discrete tokens: ``loss(target (N,) int64, z (N, C))`` and
    ``sample(z) -> (N,) int64``."""

    discrete = True  # models token ids: needs a discrete tokenizer (vocab_size)

    def __init__(self, cond_dim: int, vocab_size: int, label_smoothing: float = 0.1, top_k: int = 0,
                 top_p: float = 1.0, bias: bool = False):
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"loss.label_smoothing must be in [0, 1), got {label_smoothing}")
        if top_k < 0:
            raise ValueError(f"loss.top_k must be >= 0 (0 = off), got {top_k}")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"loss.top_p must be in (0, 1] (1 = off), got {top_p}")
        self.vocab_size, self.label_smoothing, self.top_k, self.top_p = vocab_size, label_smoothing, top_k, top_p
        self.net = nn.Linear(cond_dim, vocab_size, bias=bias)
        nn.init.normal_(self.net.weight, std=cond_dim ** -0.5)
        if bias:
            nn.init.zeros_(self.net.bias)
        self.last_metrics: dict[str, torch.Tensor] = {}

    def loss(self, target: torch.Tensor, z: torch.Tensor, mask: torch.Tensor | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """Label-smoothed CE (module docstring), mean over rows or weighted by ``mask`` (N,); fp32 log-softmax.
        ``last_metrics['nll']``: the unsmoothed NLL."""
        if target.ndim != 1 or target.dtype.is_floating_point or z.shape[0] != target.shape[0]:
            raise ValueError(f"head.loss: expected target ids (N,) int64 and z (N, C), got {tuple(target.shape)} "
                             f"{target.dtype} and {tuple(z.shape)}")
        logp = self.net(z).float().log_softmax(-1)
        nll = -logp.gather(1, target[:, None])[:, 0]
        rows = (1 - self.label_smoothing) * nll - self.label_smoothing * logp.mean(-1)
        w = None if mask is None else mask.float() / mask.float().sum()
        self.last_metrics = {"nll": (nll.mean() if w is None else (nll * w).sum()).detach()}
        return rows.mean() if w is None else (rows * w).sum()

    def guided_logits(self, z: torch.Tensor, cfg: float | None = None) -> torch.Tensor:
        """fp32 logits (N, V); with ``cfg``, ``z`` = [z_cond; z_uncond] (2N rows) and the logits are guided."""
        logits = self.net(z).float()
        if cfg is not None:
            if z.shape[0] % 2:
                raise ValueError(f"head.sample: with cfg, z must be [z_cond; z_uncond], got {z.shape[0]} rows")
            cond, uncond = logits.chunk(2)
            logits = uncond + cfg * (cond - uncond)
        return logits

    @torch.no_grad()
    def sample(self, z: torch.Tensor, temperature: float = 1.0, cfg: float | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """One id per row (with ``cfg``: see :meth:`guided_logits`)."""
        logits = self.guided_logits(z, cfg)
        if temperature == 0:
            return logits.argmax(-1)
        return gumbel_argmax(filter_logits(logits / temperature, self.top_k, self.top_p), generator)


def gumbel(shape: torch.Size, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Standard Gumbel noise -log(-log u) from the generator."""
    return -(-torch.rand(shape, generator=generator, device=device).log()).log()


def gumbel_argmax(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Gumbel-max: an exact draw from softmax(logits) per row, with no host sync (unlike ``multinomial``)."""
    return (logits + gumbel(logits.shape, generator, logits.device)).argmax(-1)
