"""Full-size parameter names and shapes against the reference models themselves (built on the meta device by
tests/fixtures/make_reference_fixtures.py): MAR-B and EAR-B as released (256 px, 1000 classes, 6 x 1024 heads) and
MAR's KL-16 VAE. A released checkpoint loads strictly iff these agree; the values are checked on small models in
the other tests of this folder."""

import torch

from contgen.backbones import EARBackbone, MARBackbone
from contgen.backbones import ear as ear_mod
from contgen.backbones import mar as mar_mod
from contgen.heads import DiffusionHead, EnergyHead
from contgen.tokenizers.kl16 import KLTokenizer
from tests.parity.replay import load

REF = load("layouts.pt")


def shapes(module, prefix=""):
    return {prefix + k: list(v.shape) for k, v in module.state_dict().items()}


def test_mar_base_layout():
    with torch.device("meta"):
        bb = MARBackbone(256, 16, 1000, **mar_mod.SIZES["B"])
        head = DiffusionHead(16, bb.cond_dim, width=1024, depth=6)
    assert {**shapes(bb), **shapes(head, "diffloss.")} == REF["mar_base"]


def test_ear_base_layout():
    with torch.device("meta"):
        bb = EARBackbone(256, 16, 1000, **ear_mod.SIZES["B"])
        head = EnergyHead(16, bb.cond_dim, width=1024, depth=6, noise_channels=64)
    assert {**shapes(bb), **shapes(head, "scoreloss.")} == REF["ear_base"]


def test_kl16_layout():
    with torch.device("meta"):
        tok = KLTokenizer(None, random_init=True)
    assert (tok.grid, tok.seq_len, tok.token_dim, tok.moment_dim) == ((16, 16), 256, 16, 32)
    assert shapes(tok) == REF["kl16"]
    assert sum(v.numel() for v in tok.state_dict().values()) == 66_456_019  # decoder without up-path attention
