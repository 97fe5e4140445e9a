"""MAR / EAR backbones: shapes, masking semantics, null class, init, sizes, reference-checkpoint import."""

from __future__ import annotations

import argparse

import pytest
import torch
from torch import nn

from contgen.backbones import EARBackbone, MARBackbone
from contgen.backbones import ear as ear_mod
from contgen.backbones import mar as mar_mod
from contgen.heads import DiffusionHead
from contgen.samplers.schedules import mask_from_order, random_orders
from contgen.utils.reference_ckpt import load_reference_mar
from tests.helpers import ROOT

L, D, K, B = 16, 4, 10, 3


def tiny_mar(**kw):
    return MARBackbone(L, D, K, encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=4, decoder_embed_dim=24,
                       decoder_depth=2, decoder_num_heads=4, buffer_size=4, **kw)


def tiny_ear(**kw):
    return EARBackbone(L, D, K, embed_dim=32, depth=2, num_heads=4, buffer_size=4, **kw)


BUILDERS = {"mar": tiny_mar, "ear": tiny_ear}


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(B, L, D, generator=g)
    labels = torch.randint(0, K, (B,), generator=g)
    return tokens, labels, random_orders(B, L, g)


@pytest.fixture(params=sorted(BUILDERS))
def model(request):
    torch.manual_seed(0)
    return BUILDERS[request.param]().eval()


@pytest.mark.parametrize("num_masked", [0, 1, 7, L])
def test_shapes(model, num_masked):
    tokens, labels, order = inputs()
    z = model(tokens, labels, order, num_masked)
    assert z.shape == (B, L, model.cond_dim) and torch.isfinite(z).all()
    assert (model.seq_len, model.token_dim, model.num_classes) == (L, D, K)


@pytest.mark.parametrize("num_masked", [1, 9, L])
def test_masked_values_are_ignored(model, num_masked):
    """Garbage (NaN) at masked positions changes neither the output nor the gradients."""
    tokens, labels, order = inputs()
    mask = mask_from_order(order, num_masked)
    garbage = torch.where(mask[..., None], torch.full_like(tokens, float("nan")), tokens)
    z_ref = model(tokens, labels, order, num_masked)
    z = model(garbage, labels, order, num_masked)
    torch.testing.assert_close(z, z_ref, rtol=0, atol=1e-6)
    z.square().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_visible_values_matter(model):
    tokens, labels, order = inputs()
    z_ref = model(tokens, labels, order, 8)
    changed = tokens.clone()
    changed[0, order[0, 8]] += 1.0  # the first visible token of sample 0
    z = model(changed, labels, order, 8)
    assert not torch.allclose(z[0], z_ref[0])
    torch.testing.assert_close(z[1:], z_ref[1:], rtol=0, atol=0)  # rows are independent


def test_drop_uses_fake_latent(model):
    tokens, _, order = inputs()
    a, b_ = torch.zeros(B, dtype=torch.long), torch.full((B,), 5)
    drop = torch.tensor([True, False, True])
    za, zb = model(tokens, a, order, 6, drop), model(tokens, b_, order, 6, drop)
    torch.testing.assert_close(za[drop], zb[drop], rtol=0, atol=0)
    assert not torch.allclose(za[~drop], zb[~drop])
    with torch.no_grad():
        model.fake_latent.add_(1.0)
    assert not torch.allclose(model(tokens, a, order, 6, drop)[drop], za[drop])


def test_fake_latent_always_in_graph(model):
    """DDP needs a gradient for every parameter every step, even when nothing is dropped."""
    tokens, labels, order = inputs()
    model(tokens, labels, order, 6).sum().backward()
    assert model.fake_latent.grad is not None and model.mask_token.grad is not None


# Numerical parity with the reference forward passes: tests/parity/ (fixtures made by the reference code).


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_grad_checkpointing_matches(name):
    tokens, labels, order = inputs()
    outs = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        m = BUILDERS[name](grad_checkpointing=ckpt, attn_dropout=0.0, proj_dropout=0.0)
        z = m(tokens, labels, order, 7)
        z.square().sum().backward()
        outs.append((z.detach(), [p.grad for p in m.parameters()]))
    torch.testing.assert_close(outs[0][0], outs[1][0])
    for g0, g1 in zip(outs[0][1], outs[1][1]):
        torch.testing.assert_close(g0, g1)


def test_bad_inputs(model):
    tokens, labels, order = inputs()
    with pytest.raises(ValueError, match="num_masked"):
        model(tokens, labels, order, L + 1)
    with pytest.raises(ValueError, match="model.token_dim"):
        model(tokens[..., :2], labels, order, 3)
    with pytest.raises(ValueError, match="buffer_size"):
        EARBackbone(L, D, K, 32, 1, 4, buffer_size=0)


def test_init_statistics():
    torch.manual_seed(0)
    m = EARBackbone(L, D, 1000, embed_dim=512, depth=1, num_heads=8)
    # N(0, 0.02): the std estimate of n samples has relative s.e. 1/sqrt(2n) (3% for n=512): 5 s.e. = 15%.
    for p in (m.fake_latent, m.mask_token, m.class_emb.weight, m.decoder_pos_embed_learned):
        assert abs(p.std().item() / 0.02 - 1) < 0.15 and abs(p.mean().item()) < 0.01
    blk = m.decoder_blocks[0]
    fc1 = blk.mlp.fc1.weight
    bound = (6 / sum(fc1.shape)) ** 0.5  # xavier-uniform bound; uniform std = bound / sqrt(3)
    assert fc1.abs().max() <= bound and abs(fc1.std().item() / (bound / 3**0.5) - 1) < 0.02
    assert (blk.mlp.fc1.bias == 0).all() and (m.z_proj.bias == 0).all()
    assert (blk.norm1.weight == 1).all() and (blk.norm1.bias == 0).all() and (m.decoder_norm.weight == 1).all()


# --- sizes (meta device: nothing is allocated) ------------------------------------------------------------
def count(module: nn.Module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


# MAR backbone = reference total (notes: B 207.92M measured, L 478.3M, H 942.4M analytic) minus its DiffLoss head
# (SimpleMLPAdaLN, token 16, learned sigma → 32 outputs): B 35.75M (6×1024), L 72.23M (8×1280), H 151.21M (12×1536).
MAR_TARGETS = {"B": (172.17, 207.92, (1024, 6)), "L": (406.07, 478.3, (1280, 8)), "H": (791.19, 942.4, (1536, 12))}
# EAR: measured transformer blocks 170.1/403.1/787.1M; paper totals 205/474/937M; generators 34.5/70.3/148.5M.
EAR_TARGETS = {"B": (170.1, 205.0, (1024, 6)), "L": (403.1, 474.0, (1280, 8)), "H": (787.1, 937.0, (1536, 12))}


def _build_meta(cls, sizes):
    with torch.device("meta"):
        return cls(256, 16, 1000, **sizes)


@pytest.mark.parametrize("size", ["B", "L", "H"])
def test_mar_param_counts(size):
    m = _build_meta(MARBackbone, mar_mod.SIZES[size])
    target, _, _ = MAR_TARGETS[size]
    assert abs(count(m) / target - 1) < 0.005, count(m)


@pytest.mark.parametrize("size", ["B", "L", "H"])
def test_ear_param_counts(size):
    m = _build_meta(EARBackbone, ear_mod.SIZES[size])
    blocks, total, _ = EAR_TARGETS[size]
    assert abs(count(m.decoder_blocks) / blocks - 1) < 0.001, count(m.decoder_blocks)
    # the notes' "transformer" count is the blocks alone; embeddings add 1.0M (B) to 1.7M (H)
    assert abs(count(m) / (total - {"B": 34.5, "L": 70.3, "H": 148.5}[size]) - 1) < 0.005, count(m)


@pytest.mark.parametrize("size", ["B", "L", "H"])
def test_mar_total_with_head(size):
    heads = pytest.importorskip("contgen.heads.diffusion")
    _, total, (width, depth) = MAR_TARGETS[size]
    m = _build_meta(MARBackbone, mar_mod.SIZES[size])
    with torch.device("meta"):
        head = heads.DiffusionHead(token_dim=16, cond_dim=m.cond_dim, width=width, depth=depth)
    assert abs((count(m) + count(head)) / total - 1) < 0.005, count(head)


@pytest.mark.parametrize("size", ["B", "L", "H"])
def test_ear_total_with_head(size):
    heads = pytest.importorskip("contgen.heads.energy")
    _, total, (width, depth) = EAR_TARGETS[size]
    m = _build_meta(EARBackbone, ear_mod.SIZES[size])
    with torch.device("meta"):
        head = heads.EnergyHead(token_dim=16, cond_dim=m.cond_dim, width=width, depth=depth, noise_channels=64)
    assert abs((count(m) + count(head)) / total - 1) < 0.005, count(head)


# --- reference checkpoint import: errors and options (values: tests/parity/) ------------------------------------
REF_CKPT = ROOT / "tests" / "fixtures" / "reference" / "mar_ckpt.pth"  # made by the reference MAR code, 10 classes


def ref_mar(classes=K, decoder_depth=2):
    """contgen's backbone and head at the sizes of the reference-made fixture (16 tokens of 16 channels)."""
    bb = MARBackbone(L, 16, classes, 32, 2, 4, 24, decoder_depth, 3, buffer_size=4)
    return bb, DiffusionHead(16, 24, width=32, depth=2, num_sampling_steps=10)


def _edited(tmp_path, edit):
    ckpt = torch.load(REF_CKPT, weights_only=True)
    edit(ckpt)
    path = tmp_path / "checkpoint-last.pth"
    torch.save(ckpt, path)
    return str(path)


def test_reference_key_errors(tmp_path):
    path = _edited(tmp_path, lambda c: None)
    with pytest.raises(ValueError, match=r"backbone:\n.*missing keys \(\d+\): decoder_blocks.2"):
        load_reference_mar(path, *ref_mar(decoder_depth=3))
    with pytest.raises(ValueError, match=r"unexpected keys \(\d+\): decoder_blocks.1"):
        load_reference_mar(path, *ref_mar(decoder_depth=1))
    with pytest.raises(ValueError, match=r"shape mismatches.*class_emb.weight: file \(10, 32\) vs model \(7, 32\)"):
        load_reference_mar(path, *ref_mar(classes=7))
    with pytest.raises(ValueError, match=r"checkpoint-last.pth does not match the head \(keys 'diffloss\.\*'\)"):
        load_reference_mar(path, ref_mar()[0], nn.Linear(24, 16))


def test_reference_missing_ema_and_file(tmp_path):
    path = _edited(tmp_path, lambda c: c.pop("model_ema"))
    with pytest.raises(ValueError, match="no .model_ema.*use_ema=false"):
        load_reference_mar(path, *ref_mar())
    load_reference_mar(path, *ref_mar(), use_ema=False)
    with pytest.raises(ValueError, match="file not found"):
        load_reference_mar(str(tmp_path / "nope.pth"), *ref_mar())


def test_reference_pickled_args_need_opt_in(tmp_path):
    path = _edited(tmp_path, lambda c: c.update(args=argparse.Namespace(model="mar_base", epochs=800)))
    with pytest.raises(ValueError, match="allow_pickle=true"):
        load_reference_mar(path, *ref_mar())
    bb, head = ref_mar()
    load_reference_mar(path, bb, head, allow_pickle=True)
    torch.testing.assert_close(bb.fake_latent, torch.load(REF_CKPT, weights_only=True)["model_ema"]["fake_latent"],
                               rtol=0, atol=0)


def test_mar_padded_encoder_matches_the_exact_length():
    """``encoder_len`` (module.compile's static encoder shape): pad slots are never attended, so z and every gradient
    are the unpadded encoder's — in float64 to 1e-10 (the same math; in fp32 the kernels' rounding differs, ~1e-5
    relative); in no-grad calls (sampling) nothing is padded."""
    tokens, labels, order = inputs()
    outs = []
    for pad in (None, 4 + L):
        torch.manual_seed(0)
        m = tiny_mar(attn_dropout=0.0, proj_dropout=0.0).double()
        m.encoder_len = pad
        z = m(tokens.double(), labels, order, 9)
        (z.square() * torch.linspace(0, 1, z.numel(), dtype=z.dtype).view_as(z)).sum().backward()
        outs.append((z.detach(), [p.grad for p in m.parameters()]))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=0, atol=1e-10)
    for g_pad, g in zip(outs[1][1], outs[0][1]):
        torch.testing.assert_close(g_pad, g, rtol=0, atol=1e-10)
    tokens = tokens.double()
    m.encoder_len = 4 + 5
    with pytest.raises(ValueError, match="encoder_len=9 < the 11 encoder slots"):
        m(tokens, labels, order, 9)
    with torch.no_grad():
        assert torch.isfinite(m(tokens, labels, order, 9)).all()  # sampling: exact length
