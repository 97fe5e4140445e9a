"""Categorical head: fairseq's label-smoothed CE by hand, top-k / top-p supports, temperature, CFG on logits."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from contgen.heads.categorical import CategoricalHead, filter_logits

pytestmark = pytest.mark.usefixtures("one_thread")

C, V = 8, 10


def head(**kw):
    torch.manual_seed(0)
    return CategoricalHead(C, V, **kw)


def fixed_logits(h, logits):
    """Make h.net output ``logits`` (1, V) for z = e_0."""
    with torch.no_grad():
        h.net.weight.zero_()
        h.net.weight[:, 0] = logits
    return torch.eye(C)[:1]


def test_label_smoothed_loss_is_fairseqs_formula_by_hand():
    """DiGIT ce_loss_ls = fairseq _compute_loss: nll·(1-ε) − mean(log p)·ε, the mean over rows and the vocabulary."""
    h, eps = head(label_smoothing=0.1), 0.1
    g = torch.Generator().manual_seed(0)
    z, target = torch.randn(6, C, generator=g), torch.randint(0, V, (6,), generator=g)
    logits = (z.double() @ h.net.weight.double().T).tolist()
    nll, mean_logp = 0.0, 0.0
    for row, t in zip(logits, target.tolist()):
        log_norm = math.log(sum(math.exp(v) for v in row))
        nll += (log_norm - row[t]) / len(logits)
        mean_logp += sum(v - log_norm for v in row) / (len(logits) * V)
    want = nll * (1 - eps) - mean_logp * eps
    assert h.loss(target, z).item() == pytest.approx(want, rel=1e-6)
    assert h.last_metrics["nll"].item() == pytest.approx(nll, rel=1e-6)
    torch.testing.assert_close(h.loss(target, z), F.cross_entropy(h.net(z), target, label_smoothing=eps))
    w = torch.tensor([1.0, 0, 2, 0, 1, 0])  # row weights: the weighted mean of the per-row losses
    rows = torch.stack([h.loss(target[i:i + 1], z[i:i + 1]) for i in range(6)])
    torch.testing.assert_close(h.loss(target, z, mask=w), (rows * w).sum() / w.sum())


def draw(h, z, n, seed=0, **kw):
    return h.sample(z.expand(n, -1), generator=torch.Generator().manual_seed(seed), **kw)


LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.8, 0.5, 0.0, -0.5, -1.0, -2.0, 0.3])


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (3, 1.0), (0, 0.6), (4, 0.6)])
def test_samples_follow_the_filtered_distribution(top_k, top_p):
    """Support = the top-k ∩ nucleus ids exactly, and each id's frequency within 5 standard deviations of a perfect
    sampler's (n = 20000 draws, fixed seed)."""
    h = head(top_k=top_k, top_p=top_p)
    z = fixed_logits(h, LOGITS)
    probs = LOGITS.softmax(-1)
    order = probs.argsort(descending=True)
    keep = torch.ones(V, dtype=torch.bool)
    if top_k:
        keep[order[top_k:]] = False
    if top_p < 1:  # fairseq: keep ids while the mass before them is < p (re-normalised after top-k)
        p = torch.where(keep, probs, 0) / torch.where(keep, probs, 0).sum()
        before = torch.cumsum(p[order], 0) - p[order]
        keep[order[before >= top_p]] = False
    want = torch.where(keep, probs, 0) / torch.where(keep, probs, 0).sum()
    n = 20000
    ids = draw(h, z, n)
    freq = torch.bincount(ids, minlength=V).double() / n
    assert set(ids.unique().tolist()) == set(keep.nonzero()[:, 0].tolist())
    assert ((freq - want).abs() <= 5 * (want * (1 - want) / n).sqrt() + 1e-12).all(), (freq, want)


def test_filter_logits_keeps_the_argmax_and_counts():
    logits = torch.randn(50, V, generator=torch.Generator().manual_seed(0))
    assert (filter_logits(logits, top_k=3).isfinite().sum(-1) == 3).all()
    tiny_p = filter_logits(logits, top_p=1e-6)
    assert (tiny_p.isfinite().sum(-1) == 1).all() and torch.equal(tiny_p.argmax(-1), logits.argmax(-1))
    assert torch.equal(filter_logits(logits), logits)


def test_temperature_to_zero_is_argmax():
    h = head(top_k=5)
    z = torch.randn(64, C, generator=torch.Generator().manual_seed(1))
    want = h.net(z).argmax(-1)
    assert torch.equal(h.sample(z, temperature=0.0), want)
    assert torch.equal(h.sample(z, temperature=1e-4, generator=torch.Generator().manual_seed(0)), want)
    assert not torch.equal(h.sample(z, temperature=1.0, generator=torch.Generator().manual_seed(0)), want)


def test_cfg_guides_the_logits():
    h = head()
    g = torch.Generator().manual_seed(2)
    zc, zu = torch.randn(16, C, generator=g), torch.randn(16, C, generator=g)
    lc, lu = h.net(zc), h.net(zu)
    out = h.sample(torch.cat([zc, zu]), temperature=0.0, cfg=2.5)
    assert out.shape == (16,) and torch.equal(out, (lu + 2.5 * (lc - lu)).argmax(-1))


def test_bad_inputs_name_their_keys():
    for kw, key in ((dict(label_smoothing=1.0), "loss.label_smoothing"), (dict(top_k=-1), "loss.top_k"),
                    (dict(top_p=0.0), "loss.top_p")):
        with pytest.raises(ValueError, match=key):
            head(**kw)
    with pytest.raises(ValueError, match="target ids"):
        head().loss(torch.zeros(4, 3), torch.zeros(4, C))
