"""Per-token heads: the distribution of one continuous token given the backbone's condition z.

The contract every head meets (the MAR/EAR plug point; any head works on any token backbone):

* ``__init__(token_dim, cond_dim, ...)`` — the caller passes the tokenizer's token width and the backbone's ``cond_dim``.
* ``loss(target (N, D), z (N, C), mask=None, generator=None) -> scalar`` — rows are the masked tokens only (the
  caller gathers them, so no head compute is spent on rows that do not count); ``mask`` optionally weights rows;
  detached diagnostics may be left in ``last_metrics``.
* ``sample(z, temperature=1.0, cfg=None, generator=None) -> (N, D)`` — with ``cfg`` None, ``z`` is (N, C); with a
  float, ``z = cat([z_cond, z_uncond])`` (2N rows) and the head applies guidance its own way (diffusion: on ε at
  every denoising step; energy: in feature space before the generator). ``temperature`` is the head's own knob.

Discrete tokens (a tokenizer with ``vocab_size``; ids (N,) int64): ``categorical`` (``discrete = True``) is built with
``(cond_dim, vocab_size)`` instead of ``token_dim``, and its ``loss`` / ``sample`` take and return ids.
"""

from contgen.heads.categorical import CategoricalHead
from contgen.heads.diffusion import DiffusionHead
from contgen.heads.energy import EnergyHead

__all__ = ["CategoricalHead", "DiffusionHead", "EnergyHead"]
