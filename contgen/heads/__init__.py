"""Per-token heads: the distribution of one continuous token given the backbone's condition z."""

from contgen.heads.diffusion import DiffusionHead

__all__ = ["DiffusionHead"]
