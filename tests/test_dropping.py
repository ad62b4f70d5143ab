"""Token dropping: kept patches are a true subset with their (row, col), rates follow the policy."""

from __future__ import annotations

import numpy as np
import pytest

from navit_clip.data.dropping import DropPolicy, apply_dropping, drop_tokens
from navit_clip.data.packing import PatchedImage


def image(rows: int, cols: int, seed: int = 0) -> PatchedImage:
    rng = np.random.default_rng(seed)
    coords = np.stack(np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij"), -1).reshape(-1, 2)
    return PatchedImage("k", rng.integers(0, 256, (rows * cols, 12), dtype=np.uint8), coords.astype(np.int64),
                        (rows, cols), np.arange(4))


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.5, 0.9, 0.99])
def test_drop_keeps_true_subset(rate):
    full = image(7, 9)
    out = drop_tokens(full, rate, np.random.default_rng(1))
    assert out.num_tokens == max(1, round(63 * (1 - rate)))
    assert out.grid == (7, 9)  # the full grid, before dropping
    index = out.coords[:, 0] * 9 + out.coords[:, 1]
    assert (np.diff(index) > 0).all()  # kept in raster order, no repeats
    np.testing.assert_array_equal(out.patches, full.patches[index])  # each patch at its true (row, col)


def test_constant_beta_resolution_rates():
    rng = np.random.default_rng(0)
    assert DropPolicy("constant", rate=0.3).rate_for(100, rng) == 0.3
    rates = [DropPolicy("beta", beta_a=2, beta_b=6, max_rate=0.5).rate_for(100, rng) for _ in range(4000)]
    assert 0 <= min(rates) and max(rates) <= 0.5
    assert np.mean(rates) == pytest.approx(0.5 * 2 / 8, abs=0.01)
    res = DropPolicy("resolution", rate=0.4, min_tokens=16, max_tokens=256)
    got = [res.rate_for(n, rng) for n in (8, 16, 136, 256, 400)]
    assert got == pytest.approx([0.0, 0.0, 0.2, 0.4, 0.4])
    assert DropPolicy().rate_for(256, rng) == 0.0
    assert apply_dropping(image(3, 3), DropPolicy(), rng).num_tokens == 9


def test_rate_schedule_over_steps():
    policy = DropPolicy("constant", rate=0.4, ramp_start=0.0, ramp_steps=100)
    rng = np.random.default_rng(0)
    assert [policy.rate_for(50, rng, step) for step in (0, 50, 100, 500)] == pytest.approx([0.0, 0.2, 0.4, 0.4])


def test_bad_policy_names_problem():
    with pytest.raises(ValueError, match="kind"):
        DropPolicy("sometimes")
    with pytest.raises(ValueError, match="rate"):
        DropPolicy("constant", rate=1.5)
