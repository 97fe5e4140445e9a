"""Token-AR backbones: tokens, labels and a masking order in, per-token conditions ``z`` out."""

from contgen.backbones.base import MaskedTokenBackbone
from contgen.backbones.ear import EARBackbone
from contgen.backbones.mar import MARBackbone

__all__ = ["EARBackbone", "MARBackbone", "MaskedTokenBackbone"]
