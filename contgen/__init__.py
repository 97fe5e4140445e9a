"""contgen: continuous-token image generation (MAR, EAR, DiGIT, UCGM, Shortcut) in one framework.

Everything below ``contgen.modules`` is plain PyTorch: importable without Hydra, Lightning or W&B.
"""

__version__ = "0.1.0"
