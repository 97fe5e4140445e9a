"""A prefix of condition ids in front of the generated tokens: DiGIT's stage 2, the pixel decoder (Zhu et al. 2024;
reference/digit.md §3), which generates a pixel tokenizer's tokens conditioned on the 16×16 K-means ids of the same
image.

DiGIT's layout (``image_generation_stage2/model.py:50-62, 105-119, 204-210``; ``model_nar.py:276-294``): the input is
``[s_1 .. s_P | EOS | t_1 .. t_L]``. The semantic ids have an embedding of their own (``prefix_emb``; DiGIT: rows of
the shared table offset by the VQ vocabulary — the same thing as a second table), and a learned position table of
their own counting from 0 (``embed_positions_1``); EOS and the target tokens use a second table, EOS at 0. contgen
holds one position table over the whole sequence, the two concatenated. The pixel decoder has no class: contgen's
start slot (the class slot of the stage-1 GPT, one class) is the EOS.

Two backbones take the prefix (``takes_prefix``; the module passes ``prefix_len`` and ``prefix_vocab``, the
semantic tokenizer's grid and K): the causal GPT (``gpt.py``: the AR prefix-LM, causal over the whole sequence as
DiGIT) and :class:`PrefixEARBackbone` (the MaskGIT variant: bidirectional, masked targets hold the mask token as
DiGIT's ``<unk>``). Neither has a null class, so neither takes label dropout or CFG.
"""

from __future__ import annotations

import torch
from torch import nn

from contgen.backbones.ear import EARBackbone


def check_prefix(prefix_len: int, prefix_vocab: int | None, label_drop_prob: float) -> None:
    """``prefix_len`` 0 = no prefix (a class-conditioned backbone); else ``prefix_vocab`` ids of the semantic tokenizer
    and no null class to drop to."""
    if prefix_len < 0 or bool(prefix_len) != bool(prefix_vocab) or (prefix_vocab is not None and prefix_vocab < 1):
        raise ValueError(f"prefix_len and prefix_vocab go together (the semantic tokenizer's grid and K), got "
                         f"prefix_len={prefix_len}, prefix_vocab={prefix_vocab}")
    if prefix_len and label_drop_prob:
        raise ValueError(f"model.label_drop_prob={label_drop_prob}: a backbone conditioned on a prefix of ids has no "
                         "null class (DiGIT's pixel decoder has no CFG); set it to 0")


class PrefixEARBackbone(EARBackbone):
    """DiGIT's MaskGIT pixel decoder on EAR's bidirectional stack: the buffer holds ``[prefix | EOS]`` (``prefix_len``
    + 1 slots) instead of copies of the class; the rest is EAR's (mask token, one position table over buffer and
    tokens — DiGIT's two tables concatenated). ``labels`` are the (B, P) condition ids."""

    takes_prefix = True

    def __init__(self, seq_len: int, num_classes: int, prefix_len: int, prefix_vocab: int, embed_dim: int,
                 token_dim: int | None = None, label_drop_prob: float = 0.0, **kwargs):
        check_prefix(prefix_len, prefix_vocab, label_drop_prob)
        super().__init__(seq_len=seq_len, token_dim=token_dim, num_classes=num_classes, embed_dim=embed_dim,
                         buffer_size=prefix_len + 1, label_drop_prob=0.0, **kwargs)
        del self.fake_latent  # no null class: a parameter without gradients would stall DDP
        self.prefix_emb = nn.Embedding(prefix_vocab, embed_dim)
        nn.init.normal_(self.prefix_emb.weight, std=0.02)  # EAR's embedding init (MaskedTokenBackbone.init_weights)

    def condition_tokens(self, labels: torch.Tensor, drop: torch.Tensor | None) -> torch.Tensor:
        """[prefix ids | EOS (the one class)] (B, P + 1, d); ``drop`` is unused (no null class)."""
        prefix = self.prefix_emb(labels)
        return torch.cat([prefix, self.class_emb.weight[:1].to(prefix.dtype).expand(labels.shape[0], 1, -1)], dim=1)
