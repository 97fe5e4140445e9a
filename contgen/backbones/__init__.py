"""Token-AR backbones: tokens, labels and a masking order in, per-token conditions ``z`` out.

The contract: ``__init__(seq_len, token_dim, num_classes, ...)`` (sizes from the tokenizer and data set), attributes
``seq_len``, ``token_dim``, ``cond_dim`` (width of z), ``num_classes``, ``label_drop_prob``, and
``forward(tokens (B, L, D), labels (B,), order (B, L), num_masked: int, drop (B,) bool | None) -> z (B, L, C)``:
positions ``order[:, :num_masked]`` are masked (a python count: static shapes, no host sync); ``drop`` selects the
learned null class. Backbones draw no random numbers: the caller does.

The causal GPT (``gpt``, module=causal_ar) takes ``seq_len, num_classes`` and ``token_dim`` or, for a discrete
tokenizer, ``vocab_size``; ``forward(tokens (B, L[, D]), labels, drop) -> z (B, L, C)`` with z of position p seeing
the tokens before p in its fixed order, plus ``new_cache`` / ``decode`` for one-token-per-step sampling.
"""

from contgen.backbones.base import MaskedTokenBackbone
from contgen.backbones.ear import EARBackbone
from contgen.backbones.gpt import GPTBackbone
from contgen.backbones.mar import MARBackbone

__all__ = ["EARBackbone", "GPTBackbone", "MARBackbone", "MaskedTokenBackbone"]
