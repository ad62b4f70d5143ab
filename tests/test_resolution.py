"""fit_grid and ResolutionPolicy: token budget, side limit, no upsampling, aspect ratio kept."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest

from navit_clip.data.resolution import ResolutionPolicy, fit_grid

REPO = Path(__file__).resolve().parents[1]
SIZE_CSVS = [REPO.parent / "shared" / "data" / name for name in (
    "image_sizes_laion_aesthetics.csv", "image_sizes_coco_val2017.csv", "image_sizes_nocaps_test.csv")]


def check_grid(width: int, height: int, patch: int, max_tokens: int, max_side: int) -> tuple[int, int]:
    """Assert every property fit_grid promises; return the grid."""
    rows, cols = fit_grid(width, height, patch, max_tokens, max_side)
    ctx = f"{width}x{height} P={patch} max_tokens={max_tokens} max_side={max_side} -> {rows}x{cols}"
    assert isinstance(rows, int) and isinstance(cols, int), ctx
    assert rows >= 1 and cols >= 1, ctx
    assert rows * cols <= max_tokens, ctx
    assert rows <= max_side and cols <= max_side, ctx
    # never upsample beyond the native grid (a side below one patch still gets one patch; rounding to
    # the nearest patch may add at most half a patch)
    native_rows, native_cols = height / patch, width / patch
    assert rows <= max(1, math.ceil(native_rows)) and cols <= max(1, math.ceil(native_cols)), ctx
    assert rows == 1 or rows * patch <= height + patch / 2, ctx
    assert cols == 1 or cols * patch <= width + patch / 2, ctx
    # aspect ratio within one patch: one common scale s puts both sides within a patch of the grid
    lo = max((rows - 1) / native_rows, (cols - 1) / native_cols)
    hi = min((rows + 1) / native_rows, (cols + 1) / native_cols)
    assert lo <= hi + 1e-9, ctx
    return rows, cols


def lognormal_sizes(rng: np.random.Generator, n: int) -> list[tuple[int, int]]:
    """Web-photo-like sizes: log-normal area around 400x300, aspect ratios mostly 0.5..2 with tails."""
    area = np.exp(rng.normal(math.log(400 * 300), 1.2, n))
    aspect = np.exp(rng.normal(math.log(1.3), 0.45, n))
    width = np.clip(np.sqrt(area * aspect), 1, 12000).astype(int)
    height = np.clip(np.sqrt(area / aspect), 1, 12000).astype(int)
    return list(zip(width.tolist(), height.tolist()))


BUDGETS = [(8, 64, 32), (16, 256, 32), (14, 196, 16), (16, 1024, 64), (32, 16, 8), (8, 1, 1), (16, 7, 64)]


@pytest.mark.parametrize("patch, max_tokens, max_side", BUDGETS)
def test_random_realistic_sizes(patch, max_tokens, max_side):
    rng = np.random.default_rng(patch * 1000 + max_tokens)
    for width, height in lognormal_sizes(rng, 500):
        check_grid(width, height, patch, max_tokens, max_side)


@pytest.mark.parametrize("patch, max_tokens, max_side", BUDGETS)
def test_random_uniform_sizes(patch, max_tokens, max_side):
    rng = np.random.default_rng(7 + max_side)
    for width, height in rng.integers(1, 2000, size=(500, 2)).tolist():
        check_grid(width, height, patch, max_tokens, max_side)


@pytest.mark.parametrize("csv_path", SIZE_CSVS, ids=lambda p: p.stem)
def test_real_image_size_distributions(csv_path):
    if not csv_path.exists():
        pytest.skip(f"{csv_path} not available")
    with csv_path.open() as f:
        sizes = [(int(r["width"]), int(r["height"])) for r in csv.DictReader(f)]
    assert len(sizes) > 1000
    rng = np.random.default_rng(0)
    picks = rng.choice(len(sizes), size=min(800, len(sizes)), replace=False)
    for patch, max_tokens, max_side in [(16, 256, 32), (14, 576, 64), (8, 64, 32)]:
        for i in picks:
            check_grid(*sizes[i], patch, max_tokens, max_side)


@pytest.mark.parametrize("patch, max_tokens", [(8, 16), (8, 64), (16, 256), (14, 1024)])
def test_downscaled_grid_uses_most_of_the_budget(patch, max_tokens):
    """'The largest grid': an image far above the budget (aspect <= 4) fills >= 70% of it."""
    rng = np.random.default_rng(max_tokens)
    for width, height in lognormal_sizes(rng, 500):
        if max(width / height, height / width) > 4 or (width / patch) * (height / patch) < 2 * max_tokens:
            continue
        rows, cols = check_grid(width, height, patch, max_tokens, 10**6)
        assert rows * cols >= 0.7 * max_tokens, (width, height, rows, cols)


@pytest.mark.parametrize("width, height", [(64, 64), (200, 50), (24, 160), (100, 30), (37, 91), (8, 8)])
def test_native_size_kept_when_it_fits(width, height):
    """Within the budget the grid is the native size, to the nearest patch."""
    rows, cols = check_grid(width, height, 8, 10**6, 10**6)
    assert abs(rows - height / 8) <= 0.5 and abs(cols - width / 8) <= 0.5


def test_exact_multiples_are_exact():
    assert fit_grid(128, 64, 16, 64, 32) == (4, 8)
    assert fit_grid(640, 480, 16, 10**6, 100) == (30, 40)
    assert fit_grid(1024, 1024, 16, 256, 64) == (16, 16)


def test_tiny_image_gets_one_patch():
    assert fit_grid(1, 1, 16, 64, 32) == (1, 1)
    assert fit_grid(5, 3, 16, 64, 32) == (1, 1)


@pytest.mark.parametrize("width, height, patch, max_tokens, max_side, expected", [
    (1, 300, 8, 64, 32, (32, 1)),  # tall sliver: capped by max_side, one column
    (300, 1, 8, 64, 32, (1, 32)),
    (1, 300, 8, 16, 32, (16, 1)),  # capped by the token budget
    (300, 1, 16, 4, 100, (1, 4)),
    (1, 3000, 16, 1024, 64, (64, 1)),
    (3000, 1, 16, 1, 64, (1, 1)),
])
def test_extreme_aspect_ratios(width, height, patch, max_tokens, max_side, expected):
    assert check_grid(width, height, patch, max_tokens, max_side) == expected


@pytest.mark.parametrize("aspect", [2.0, 3.0, 4.0, 0.25, 1 / 3])
def test_aspect_ratio_preserved_when_downscaled(aspect):
    width, height = (int(2400 * aspect), 2400) if aspect >= 1 else (2400, int(2400 / aspect))
    rows, cols = check_grid(width, height, 16, 256, 64)
    assert cols / rows == pytest.approx(width / height, rel=0.2)


@pytest.mark.parametrize("args", [
    (0, 10, 8, 64, 32), (10, 0, 8, 64, 32), (-5, 10, 8, 64, 32),
    (10, 10, 8, 0, 32), (10, 10, 8, 64, 0), (10, 10, 8, -1, 32),
])
def test_invalid_input_raises(args):
    with pytest.raises(ValueError):
        fit_grid(*args)


def test_policy_native_is_deterministic_and_needs_no_rng():
    policy = ResolutionPolicy(patch_size=16, max_tokens=64, max_side=32, mode="native")
    for width, height in [(200, 50), (640, 480), (33, 17)]:
        grid = policy.grid_for(width, height)
        assert grid == fit_grid(width, height, 16, 64, 32)
        assert all(policy.grid_for(width, height, np.random.default_rng(s)) == grid for s in range(5))


@pytest.mark.parametrize("min_tokens, max_tokens", [(16, 64), (1, 9), (10, 10), (4, 256)])
def test_policy_sampled_budget_within_bounds(min_tokens, max_tokens):
    policy = ResolutionPolicy(patch_size=8, max_tokens=max_tokens, max_side=64, mode="sampled",
                              min_tokens=min_tokens)
    rng = np.random.default_rng(0)
    width, height = 4000, 3000  # far above any budget here: the grid size tracks the drawn budget
    tokens = []
    for _ in range(400):
        rows, cols = policy.grid_for(width, height, rng)
        assert rows * cols <= max_tokens
        tokens.append(rows * cols)
    assert min(tokens) >= 0.7 * min_tokens - 1
    if max_tokens - min_tokens >= 8:
        assert len(set(tokens)) > 3, "sampled mode should vary the size"
        assert max(tokens) >= 0.75 * max_tokens


def test_policy_sampled_budget_draws_cover_range(monkeypatch):
    """The budget handed to fit_grid is uniform over [min_tokens, max_tokens] (both ends included)."""
    import navit_clip.data.resolution as resolution

    budgets = []
    real = resolution.fit_grid

    def spy(width, height, patch, max_tokens, max_side):
        budgets.append(max_tokens)
        return real(width, height, patch, max_tokens, max_side)

    monkeypatch.setattr(resolution, "fit_grid", spy)
    policy = ResolutionPolicy(patch_size=8, max_tokens=20, max_side=64, mode="sampled", min_tokens=12)
    rng = np.random.default_rng(1)
    for _ in range(900):
        policy.grid_for(500, 300, rng)
    assert min(budgets) == 12 and max(budgets) == 20
    assert set(budgets) == set(range(12, 21))
    counts = np.bincount(budgets)[12:]
    assert counts.min() > 900 / 9 * 0.6


def test_policy_sampled_is_reproducible_and_needs_rng():
    policy = ResolutionPolicy(patch_size=8, max_tokens=64, max_side=32, mode="sampled", min_tokens=4)
    a = [policy.grid_for(400, 300, np.random.default_rng(3)) for _ in range(3)]
    rng1, rng2 = np.random.default_rng(5), np.random.default_rng(5)
    assert [policy.grid_for(400, 300, rng1) for _ in range(20)] == [policy.grid_for(400, 300, rng2) for _ in range(20)]
    assert len(set(a)) == 1
    with pytest.raises(ValueError, match="random generator"):
        policy.grid_for(400, 300)


def test_policy_unknown_mode():
    with pytest.raises(ValueError, match="unknown resolution mode"):
        ResolutionPolicy(patch_size=8, max_tokens=64, max_side=32, mode="fixed").grid_for(100, 100)


# ------------------------------------------------------------ side-length sampling and schedule


@pytest.mark.parametrize("mode", ["side_uniform", "side_normal"])
def test_side_sampling_stays_in_budget_and_keeps_aspect(mode):
    policy = ResolutionPolicy(patch_size=16, max_tokens=256, max_side=64, mode=mode, min_tokens=16)
    rng = np.random.default_rng(0)
    budgets = [policy.budget(rng) for _ in range(3000)]
    assert 16 <= min(budgets) and max(budgets) <= 256
    sides = np.sqrt(budgets)
    if mode == "side_uniform":  # sides uniform on [4, 16]: mean 10, each third about a third
        assert sides.mean() == pytest.approx(10, abs=0.25)
        assert np.mean(sides < 8) == pytest.approx(1 / 3, abs=0.04)
    else:  # normal around the middle, truncated: concentrated in the middle
        assert sides.mean() == pytest.approx(10, abs=0.3)
        assert np.mean(np.abs(sides - 10) < 3) > 0.55
    rows, cols = policy.grid_for(1600, 400, rng)
    assert cols >= 3 * rows


def test_side_normal_low_mean_favours_low_resolution():
    low = ResolutionPolicy(16, 256, 64, "side_normal", 16, side_mean=0.1, side_std=0.2)
    high = ResolutionPolicy(16, 256, 64, "side_normal", 16, side_mean=0.9, side_std=0.2)
    rng = np.random.default_rng(1)
    assert np.mean([low.budget(rng) for _ in range(500)]) < 0.6 * np.mean([high.budget(rng) for _ in range(500)])


def test_budget_ramp_over_steps():
    policy = ResolutionPolicy(16, 256, 64, "native", ramp_start_tokens=64, ramp_steps=100)
    assert [policy.max_tokens_at(s) for s in (0, 50, 100, 1000)] == [64, 160, 256, 256]
    assert policy.grid_for(1024, 1024, step=0) == (8, 8) and policy.grid_for(1024, 1024, step=100) == (16, 16)
