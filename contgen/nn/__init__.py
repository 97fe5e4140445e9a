"""Building blocks shared by backbones and heads (plain PyTorch)."""

from contgen.nn.adaln import AdaLNMLP, modulate, timestep_embedding
from contgen.nn.transformer import Block

__all__ = ["AdaLNMLP", "Block", "modulate", "timestep_embedding"]
