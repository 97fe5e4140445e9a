"""Frozen feature encoders (images in [-1, 1] -> (B, h*w, D) patch features) for discriminative tokenizers (DiGIT)."""

from contgen.encoders.base import FeatureEncoder
from contgen.encoders.builtin import BuiltinEncoder
from contgen.encoders.dinov2 import DINOv2Encoder

__all__ = ["BuiltinEncoder", "DINOv2Encoder", "FeatureEncoder"]
