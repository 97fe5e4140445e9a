"""module.mask_ratio=cosine: MaskGIT's / DiGIT's training mask count (CosineMaskCount) against its formula."""

import math

import pytest
import torch

from contgen.samplers.schedules import CosineMaskCount, MaskRatio, make_mask_ratio


def cosine_pmf(seq_len: int) -> list[float]:
    """P(n = k), k = 1..L, for n = min(L, floor(L·cos(u·π/2) + 1)), u ~ U(0, 1): n >= k iff
    cos(u·π/2) >= (k − 1)/L, i.e. u <= (2/π)·arccos((k − 1)/L), so P(n >= k) = (2/π)·arccos((k − 1)/L) and
    P(n = k) is the difference."""
    tail = [2 / math.pi * math.acos((k - 1) / seq_len) for k in range(1, seq_len + 2)]  # tail[L] = P(n >= L + 1) = 0
    return [tail[k] - tail[k + 1] for k in range(seq_len)]


@pytest.mark.parametrize("seq_len", [16, 5])
def test_cosine_count_follows_the_formula(seq_len):
    """20000 draws from a fixed seed. Each bin's frequency is a binomial proportion with standard deviation
    sqrt(p(1 − p)/N); every bin must lie within 5 of them of the formula's p (a correct sampler fails this with
    probability < 16 · 6e-7 per seed), and the mean within 5 standard errors (sd(n) <= L/2) of Σ k·p_k."""
    n_draws, g = 20000, torch.Generator().manual_seed(0)
    draws = [CosineMaskCount().num_masked(seq_len, g) for _ in range(n_draws)]
    assert min(draws) >= 1 and max(draws) <= seq_len
    pmf = cosine_pmf(seq_len)
    assert abs(sum(pmf) - 1) < 1e-12
    for k, p in enumerate(pmf, start=1):
        freq = draws.count(k) / n_draws
        assert abs(freq - p) <= 5 * math.sqrt(p * (1 - p) / n_draws), (k, freq, p)
    mean = sum(k * p for k, p in enumerate(pmf, start=1))
    assert abs(sum(draws) / n_draws - mean) <= 5 * (seq_len / 2) / math.sqrt(n_draws)


def test_cosine_count_is_skewed_to_many_masked():
    """cos is concave on [0, π/2]: more than half the draws mask more than L/2 (P = (2/π)·arccos(1/2) = 2/3)."""
    pmf = cosine_pmf(256)
    assert abs(sum(pmf[128:]) - 2 / 3) < 0.01 and pmf[-1] > pmf[0]


def test_cosine_count_edges_and_generator(monkeypatch):
    """u = 0 would give L + 1: clamped to L; u → 1 gives 1 (at least one masked). The draw is reproducible from the
    CPU generator."""
    for u, want in ((0.0, 16), (1 - 1e-9, 1)):
        monkeypatch.setattr(torch, "rand", lambda *a, u=u, **k: torch.tensor(u, dtype=torch.float64))
        assert CosineMaskCount().num_masked(16) == want
    monkeypatch.undo()
    a = [CosineMaskCount().num_masked(64, torch.Generator().manual_seed(3)) for _ in range(2)]
    assert a[0] == a[1]


def test_make_mask_ratio_names_the_key():
    assert isinstance(make_mask_ratio("truncnorm", 0.7), MaskRatio)
    assert isinstance(make_mask_ratio("cosine"), CosineMaskCount)
    with pytest.raises(ValueError, match="module.mask_ratio must be one of"):
        make_mask_ratio("uniform")
