"""Respaced sampling steps equal the reference's ``space_timesteps`` for every count (fixture made by the
reference code itself: tests/fixtures/make_reference_fixtures.py)."""

from pathlib import Path

import numpy as np
import pytest

from contgen.heads.gaussian_diffusion import space_timesteps

FIXTURE = Path(__file__).parents[1] / "fixtures" / "reference" / "respacing_1000.npz"


def test_every_count_from_1_to_1000_keeps_the_reference_steps():
    kept = np.unpackbits(np.load(FIXTURE)["kept"], axis=1)[:, :1000].astype(bool)
    wrong = [n for n in range(1, 1001) if space_timesteps(1000, n) != np.flatnonzero(kept[n - 1]).tolist()]
    assert wrong == []


def test_count_21_keeps_the_accumulated_position():
    # k = 10: 10 · 49.95 = 499.5 rounds (half to even) to 500, but ten accumulated strides give 499.49999… → 499
    kept = np.unpackbits(np.load(FIXTURE)["kept"], axis=1)[20, :1000].astype(bool)
    naive = sorted({round(k * 999 / 20) for k in range(21)})
    assert 499 in space_timesteps(1000, 21) and 500 in naive
    assert space_timesteps(1000, 21) == np.flatnonzero(kept).tolist()


def test_count_out_of_range_is_a_clear_error():
    with pytest.raises(ValueError, match="head.num_sampling_steps"):
        space_timesteps(1000, 0)
