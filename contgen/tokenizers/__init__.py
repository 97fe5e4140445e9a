"""Frozen image tokenizers: images in [-1, 1] <-> continuous tokens (B, L, D)."""

from contgen.tokenizers.base import Tokenizer, patchify, unpatchify
from contgen.tokenizers.kl16 import KLTokenizer
from contgen.tokenizers.patch import PatchTokenizer

__all__ = ["KLTokenizer", "PatchTokenizer", "Tokenizer", "patchify", "unpatchify"]
