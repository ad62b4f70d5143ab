"""Position embeddings: each kind against a hand-written formula, fractional invariance to
resolution, and the documented behaviour for grids larger than the table (extrapolation)."""

from __future__ import annotations

import math

import pytest
import torch

from navit_clip.model.posemb import FactorizedPosEmb, LearnedPosEmb2D, build_posemb

M = 8  # table side
D = 8


def grid_coords(rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All (row, col) of a rows×cols grid [n, 2] and their image's sides [n, 2]."""
    coords = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"), -1).reshape(-1, 2)
    return coords, torch.tensor([rows, cols]).expand_as(coords)


def hand_sinusoid(p: float, dim: int) -> torch.Tensor:
    half = dim // 2
    return torch.tensor([math.sin(p / 10_000 ** (2 * i / dim)) for i in range(half)]
                        + [math.cos(p / 10_000 ** (2 * i / dim)) for i in range(half)])


ALL_KINDS = [(kind, coords, combine) for kind in ("learned", "sinusoidal", "fourier")
             for coords in ("absolute", "fractional") for combine in ("sum", "stack", "product")]
ALL_KINDS += [("learned_2d", "absolute", "sum"), ("learned_2d", "fractional", "sum")]


def make(kind: str, coords: str = "absolute", combine: str = "sum", dim: int = D) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_posemb(dim=dim, max_side=M, kind=kind, coords=coords, combine=combine)


@pytest.mark.parametrize("combine", ["sum", "stack", "product"])
def test_learned_absolute_combines_row_and_col_tables(combine):
    pe = make("learned", "absolute", combine)
    coords, sides = grid_coords(3, 7)
    out = pe(coords, sides)
    assert out.shape == (21, D)
    for (r, c), got in zip(coords.tolist(), out):
        want = {"sum": pe.rows[r] + pe.cols[c], "stack": torch.cat([pe.rows[r], pe.cols[c]]),
                "product": pe.rows[r] * pe.cols[c]}[combine]
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_sinusoidal_absolute_matches_formula_and_extrapolates():
    pe = make("sinusoidal", "absolute", "stack", dim=8)
    coords = torch.tensor([[0, 3], [5, 1], [20, 31]])  # rows 20 and cols 31 lie beyond the table side 8
    out = pe(coords, torch.tensor([[1, 4], [6, 2], [21, 32]]))
    for (r, c), got in zip(coords.tolist(), out):
        torch.testing.assert_close(got, torch.cat([hand_sinusoid(r, 4), hand_sinusoid(c, 4)]), atol=1e-5, rtol=1e-5)


def test_fourier_matches_hand_written_features():
    pe = make("fourier", "absolute", "sum")
    coords, sides = grid_coords(2, 3)
    out = pe(coords, sides)

    def axis(module, p):
        angles = 2 * math.pi * p / M * module.freqs
        return module.proj(torch.cat([angles.sin(), angles.cos()]))

    for (r, c), got in zip(coords.tolist(), out):
        torch.testing.assert_close(got, axis(pe.rows, r) + axis(pe.cols, c), atol=1e-5, rtol=1e-5)


def test_learned_2d_absolute_reads_its_table():
    pe = make("learned_2d")
    coords, sides = grid_coords(4, 8)
    out = pe(coords, sides)
    for (r, c), got in zip(coords.tolist(), out):
        torch.testing.assert_close(got, pe.table[r, c], atol=0, rtol=0)


def test_learned_fractional_interpolates_the_table():
    pe = make("learned", "fractional", "stack")
    half = D // 2
    # side 3 on an 8-entry table: index 1 sits at 1/3 * 8 = 2.667, between entries 2 and 3
    out = pe(torch.tensor([[1, 0]]), torch.tensor([[3, 4]]))[0]
    torch.testing.assert_close(out[:half], pe.rows[2] / 3 + pe.rows[3] * 2 / 3, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out[half:], pe.cols[0], atol=0, rtol=0)


@pytest.mark.parametrize("kind,coords,combine", [k for k in ALL_KINDS if k[1] == "fractional"])
def test_fractional_depends_on_relative_place_only(kind, coords, combine):
    """Patch 1 of 4 and patch 2 of 8 (and 3 of 12, beyond the table) are the same place."""
    pe = make(kind, coords, combine)
    out = pe(torch.tensor([[1, 3], [2, 6], [3, 9]]), torch.tensor([[4, 4], [8, 8], [12, 12]]))
    torch.testing.assert_close(out[1], out[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[2], out[0], atol=1e-5, rtol=1e-5)
    # and differs from another place
    other = pe(torch.tensor([[0, 3]]), torch.tensor([[4, 4]]))[0]
    assert not torch.allclose(other, out[0], atol=1e-4)


@pytest.mark.parametrize("kind,coords,combine", [k for k in ALL_KINDS if k[1] == "absolute"])
def test_absolute_embedding_ignores_the_side_within_the_table(kind, coords, combine):
    pe = make(kind, coords, combine)
    a = pe(torch.tensor([[2, 3]]), torch.tensor([[3, 4]]))
    b = pe(torch.tensor([[2, 3]]), torch.tensor([[M, M]]))
    torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("kind,coords,combine", ALL_KINDS)
def test_grid_larger_than_table_is_finite(kind, coords, combine):
    pe = make(kind, coords, combine)
    coords_, sides = grid_coords(3 * M, 2 * M + 1)
    out = pe(coords_, sides)
    assert out.shape == (len(coords_), D)
    assert torch.isfinite(out).all()
    # distinct places stay distinct at the ends of the grid
    assert not torch.allclose(out[0], out[-1], atol=1e-4)


@pytest.mark.parametrize("kind", ["learned", "learned_2d"])
def test_learned_absolute_beyond_table_resamples_it(kind):
    """A side of 15 > 8 reads the table resized to 15 entries (corners aligned): index 0 is entry
    0, index 14 is entry 7, index 7 lies at 7·7/14 = 3.5, halfway between entries 3 and 4."""
    pe = make(kind, "absolute", "stack" if kind == "learned" else "sum")
    sides = torch.tensor([[15, 15]]).expand(3, 2)
    out = pe(torch.tensor([[0, 0], [14, 14], [7, 7]]), sides)
    if kind == "learned":
        h = D // 2
        torch.testing.assert_close(out[0], torch.cat([pe.rows[0], pe.cols[0]]), atol=0, rtol=0)
        torch.testing.assert_close(out[1], torch.cat([pe.rows[7], pe.cols[7]]), atol=1e-6, rtol=0)
        torch.testing.assert_close(out[2, :h], (pe.rows[3] + pe.rows[4]) / 2, atol=1e-6, rtol=1e-6)
    else:
        t = pe.table
        torch.testing.assert_close(out[0], t[0, 0], atol=0, rtol=0)
        torch.testing.assert_close(out[1], t[7, 7], atol=1e-6, rtol=0)
        torch.testing.assert_close(out[2], (t[3, 3] + t[3, 4] + t[4, 3] + t[4, 4]) / 4, atol=1e-6, rtol=1e-6)


def test_beyond_table_without_sides_is_a_clear_error():
    pe = FactorizedPosEmb(dim=4, max_side=5)
    with pytest.raises(ValueError, match=r"model\.vision\.max_grid_side"):
        pe(torch.tensor([[0, 0], [5, 0]]))
    with pytest.raises(ValueError, match="grid"):
        FactorizedPosEmb(dim=4, max_side=5, coords="fractional")(torch.tensor([[0, 0]]))


@pytest.mark.parametrize("kind,coords,combine", ALL_KINDS)
def test_every_kind_backpropagates(kind, coords, combine):
    pe = make(kind, coords, combine)
    coords_, sides = grid_coords(3, 5)
    if kind == "sinusoidal":
        assert not list(pe.parameters())  # fixed functions, nothing to learn
        return
    pe(coords_, sides).square().sum().backward()
    grads = [p.grad for p in pe.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(g.abs().sum() > 0 for g in grads)


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="kind"):
        FactorizedPosEmb(dim=4, max_side=5, kind="rotary")
    with pytest.raises(ValueError, match="even"):
        FactorizedPosEmb(dim=5, max_side=5, combine="stack")
    with pytest.raises(ValueError, match="even"):
        FactorizedPosEmb(dim=6, max_side=5, kind="sinusoidal", combine="stack")
    with pytest.raises(ValueError, match="coords"):
        LearnedPosEmb2D(dim=4, max_side=5, coords="relative")
