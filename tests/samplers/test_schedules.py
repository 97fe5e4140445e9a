import math

import pytest
import torch

from contgen.samplers.schedules import MaskRatio, cfg_schedule, cosine_mask_schedule, mask_from_order, random_orders


@pytest.mark.parametrize("seq_len,num_iter", [(256, 64), (256, 16), (64, 8), (16, 3)])
def test_cosine_schedule_matches_formula(seq_len, num_iter):
    """Tokens still masked after step k = floor(L cos(pi/2 (k+1)/n)) unless the clamp [1, masked-1] binds."""
    schedule = cosine_mask_schedule(seq_len, num_iter)
    assert len(schedule) == num_iter and schedule[-1] == 0
    masked = seq_len
    for k, nxt in enumerate(schedule[:-1]):
        raw = math.floor(seq_len * math.cos(math.pi / 2 * (k + 1) / num_iter))
        assert nxt == max(1, min(raw, masked - 1))
        assert 1 <= masked - nxt  # at least one token per step
        masked = nxt
    per_step = [a - b for a, b in zip([seq_len] + schedule[:-1], schedule)]
    assert sum(per_step) == seq_len


def test_cosine_schedule_known_values_256_16():
    # mar.md §3: num_iter=16 predicts 2, 3, 7, ... tokens in its first steps
    schedule = cosine_mask_schedule(256, 16)
    per_step = [a - b for a, b in zip([256] + schedule[:-1], schedule)]
    assert per_step[:3] == [2, 3, 7]
    assert per_step[-1] == 25


@pytest.mark.parametrize("seq_len", [16, 256])
def test_num_iter_equal_seq_len_predicts_one_token_per_step(seq_len):
    schedule = cosine_mask_schedule(seq_len, seq_len)
    assert schedule == list(range(seq_len - 1, -1, -1))


def test_num_iter_out_of_range_is_a_clear_error():
    with pytest.raises(ValueError, match="sampler.num_iter"):
        cosine_mask_schedule(16, 17)


def test_cfg_schedule_values():
    # linear: 1 + (cfg - 1) (L - max(1, mask_len_next)) / L; constant: cfg
    assert cfg_schedule(3.0, "linear", 256, 256) == 1.0
    assert cfg_schedule(2.9, "linear", 256, 192) == pytest.approx(1 + 1.9 * 64 / 256)
    assert cfg_schedule(2.9, "constant", 256, 192) == 2.9
    values = [cfg_schedule(3.0, "linear", 256, m) for m in cosine_mask_schedule(256, 64)]
    assert all(a <= b for a, b in zip(values, values[1:]))
    with pytest.raises(ValueError, match="cfg_schedule"):
        cfg_schedule(3.0, "cosine", 256, 0)


def test_linear_cfg_on_the_last_step_clamps_like_the_reference():
    """mar.py:296-318 / EAR ear.py:258-281 clamp mask_len to >= 1 before the scale, also on the last step, so
    the last scale is 1 + (cfg - 1)(L - 1)/L, not cfg (2.8926 at cfg 2.9, L 256)."""
    last = cosine_mask_schedule(256, 64)[-1]
    assert last == 0
    assert cfg_schedule(2.9, "linear", 256, last) == pytest.approx(1 + 1.9 * 255 / 256, abs=1e-12)
    assert round(cfg_schedule(2.9, "linear", 256, last), 4) == 2.8926
    assert cfg_schedule(2.9, "linear", 256, 1) == cfg_schedule(2.9, "linear", 256, 0)


def test_mask_ratio_range_and_distribution():
    """ceil(L r) with r ~ N(1, .25^2) truncated to [0.7, 1]: mean of the truncated normal is 1 - .25 phi(0)... ≈ 0.8636
    (computed below with scipy); 4000 draws give a standard error ≈ 0.08/sqrt(4000) ≈ 0.0013, so 0.01 is ~8 s.e."""
    from scipy.stats import truncnorm

    ratio, g = MaskRatio(0.7), torch.Generator().manual_seed(0)
    counts = torch.tensor([ratio.num_masked(256, g) for _ in range(4000)], dtype=torch.float64)
    assert counts.min() >= math.ceil(0.7 * 256) and counts.max() <= 256
    expected = truncnorm(-1.2, 0, loc=1, scale=0.25).mean()
    assert abs(counts.mean().item() / 256 - expected) < 0.01


def test_orders_are_permutations_and_mask_from_order():
    g = torch.Generator().manual_seed(0)
    order = random_orders(5, 16, g)
    assert torch.equal(order.sort(1).values, torch.arange(16).expand(5, 16))
    mask = mask_from_order(order, 6)
    assert mask.sum(1).tolist() == [6] * 5
    assert mask.gather(1, order[:, :6]).all() and not mask.gather(1, order[:, 6:]).any()
