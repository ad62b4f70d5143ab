"""2-D position embeddings for packed patches of images of any size, NaViT's menu of them.

Each patch has (row, col) inside its image's grid of (rows, cols) patches. Two choices:

- coordinates: `absolute` embeds the patch index (0, 1, 2, ...); `fractional` embeds index / side,
  in [0, 1), so a patch keeps its relative place whatever the resolution. Internally both become a
  continuous position in units of a max_side grid: absolute p = index, fractional p = index / side · M
  (M = model.vision.max_grid_side), so the two agree for an image whose side is M.
- kind: `learned` (a table of M entries per axis, read by linear interpolation at p),
  `sinusoidal` (fixed sin/cos of p), `fourier` (learned Fourier features, NeRF-style: sin/cos of p
  at learned frequencies, then a linear map), or `learned_2d` (one M×M table, not factorized:
  the Pix2Struct-style baseline, read by bilinear interpolation).

Factorized kinds embed rows and columns separately and combine them (`combine`): `sum` (NaViT's
default), `stack` (each axis gets half the width, concatenated) or `product` (elementwise).

Sizes beyond what was trained (extrapolation) never fail, and behave as follows:
- learned / learned_2d, absolute: an image side larger than M reads its axis of the table resampled
  to that side (linear, corners aligned), as ViTs resize their table for higher resolution;
  sides up to M read the table entries unchanged.
- learned / learned_2d, fractional: p < M always; the table is read by interpolation, so any side
  works (the last entry is held beyond p = M - 1).
- sinusoidal / fourier: p is a continuous input, so any index or side works: absolute indices
  beyond M continue the functions, fractional ones stay in [0, M).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from navit_clip.config import POSEMB_COMBINES, POSEMB_COORDS


def positions(coords: torch.Tensor, sides: torch.Tensor | None, *, max_side: int, coord_kind: str,
              resample_beyond_table: bool) -> torch.Tensor:
    """coords [..., 2] int, sides [..., 2] int (rows, cols of each patch's image) -> continuous
    positions [..., 2] float in units of a max_side grid (see the module docstring)."""
    index = coords.float()
    if coord_kind == "fractional":
        if sides is None:
            raise ValueError("fractional position embeddings need each image's grid (rows, cols)")
        return index / sides.clamp(min=1).float() * max_side
    if resample_beyond_table:
        if sides is not None:  # decided per image from its own side, so packing cannot change it
            side = sides.clamp(min=1).float()
            scale = torch.where(side > max_side, (max_side - 1) / (side - 1).clamp(min=1), torch.ones_like(side))
            return index * scale
        if coords.numel() and not torch.compiler.is_compiling() and int(coords.max()) >= max_side:
            raise ValueError(f"patch coordinate {int(coords.max())} exceeds the position table "
                             f"(model.vision.max_grid_side={max_side}); pass the image grids to resample it")
    return index


def interpolate_rows(table: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """table [M, d], p [...] float -> [..., d]: linear interpolation, clamped to [0, M-1]. At an
    integer p the result is exactly table[p] and only that entry receives gradient."""
    p = p.clamp(0, table.shape[0] - 1)
    lo = p.floor().long()
    hi = (lo + 1).clamp(max=table.shape[0] - 1)
    w = (p - lo.float()).unsqueeze(-1).to(table.dtype)
    return table[lo] * (1 - w) + table[hi] * w


def sinusoid(p: torch.Tensor, dim: int, base: float = 10_000.0) -> torch.Tensor:
    """p [...] -> [..., dim]: the transformer's sin/cos at geometric frequencies (dim even)."""
    freqs = base ** (-torch.arange(0, dim, 2, device=p.device, dtype=torch.float32) / dim)
    angles = p.float().unsqueeze(-1) * freqs
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class FourierAxis(nn.Module):
    """Learned Fourier features of one axis: [sin, cos](2π·p/M·w) at learned frequencies w, then a
    linear map to the embedding width (Tancik et al.; Li et al. 2021)."""

    def __init__(self, *, dim: int, max_side: int, features: int = 64, scale: float = 4.0) -> None:
        super().__init__()
        self.max_side = max_side
        self.freqs = nn.Parameter(torch.randn(features) * scale)
        self.proj = nn.Linear(2 * features, dim)
        nn.init.normal_(self.proj.weight, std=0.02)
        nn.init.zeros_(self.proj.bias)

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        angles = 2 * math.pi * (p.unsqueeze(-1) / self.max_side) * self.freqs
        return self.proj(torch.cat([angles.sin(), angles.cos()], dim=-1).to(self.proj.weight.dtype))


class FactorizedPosEmb(nn.Module):
    """emb_rows(row) ⊕ emb_cols(col), ⊕ one of sum / stack / product. Factorized tables need 2·M
    entries instead of M², and a 2×30 banner and a 30×2 strip read the same tables."""

    def __init__(self, *, dim: int, max_side: int, kind: str = "learned", coords: str = "absolute",
                 combine: str = "sum") -> None:
        super().__init__()
        if kind not in ("learned", "sinusoidal", "fourier"):
            raise ValueError(f"unknown factorized position embedding kind {kind!r}")
        if coords not in POSEMB_COORDS or combine not in POSEMB_COMBINES:
            raise ValueError(f"position embedding coords must be one of {POSEMB_COORDS} and combine one of "
                             f"{POSEMB_COMBINES}")
        self.max_side, self.kind, self.coord_kind, self.combine = max_side, kind, coords, combine
        self.axis_dim = dim // 2 if combine == "stack" else dim
        if combine == "stack" and dim % 2:
            raise ValueError(f"stacked position embeddings need an even width, got {dim}")
        if kind == "learned":
            # a product of two N(0, σ²) entries has std σ², so start product tables at √0.02
            std = math.sqrt(0.02) if combine == "product" else 0.02
            self.rows = nn.Parameter(torch.randn(max_side, self.axis_dim) * std)
            self.cols = nn.Parameter(torch.randn(max_side, self.axis_dim) * std)
        elif kind == "fourier":
            self.rows = FourierAxis(dim=self.axis_dim, max_side=max_side)
            self.cols = FourierAxis(dim=self.axis_dim, max_side=max_side)
        elif self.axis_dim % 2:
            raise ValueError(f"sinusoidal position embeddings need an even per-axis width, got {self.axis_dim}")

    def embed_axis(self, axis: int, p: torch.Tensor) -> torch.Tensor:
        if self.kind == "learned":
            return interpolate_rows(self.rows if axis == 0 else self.cols, p)
        if self.kind == "fourier":
            return (self.rows if axis == 0 else self.cols)(p)
        return sinusoid(p, self.axis_dim)

    def forward(self, coords: torch.Tensor, sides: torch.Tensor | None = None) -> torch.Tensor:
        """coords [..., 2] (row, col), sides [..., 2] (rows, cols of the patch's image) -> [..., dim].
        `sides` is needed for fractional coordinates and for absolute indices beyond the table."""
        p = positions(coords, sides, max_side=self.max_side, coord_kind=self.coord_kind,
                      resample_beyond_table=self.kind == "learned")
        r, c = self.embed_axis(0, p[..., 0]), self.embed_axis(1, p[..., 1])
        if self.combine == "sum":
            return r + c
        if self.combine == "stack":
            return torch.cat([r, c], dim=-1)
        return r * c


class LearnedPosEmb2D(nn.Module):
    """One learned M×M table indexed by (row, col), not factorized: the baseline NaViT compares
    against (Pix2Struct's). Read by bilinear interpolation at continuous positions."""

    def __init__(self, *, dim: int, max_side: int, coords: str = "absolute") -> None:
        super().__init__()
        if coords not in POSEMB_COORDS:
            raise ValueError(f"position embedding coords must be one of {POSEMB_COORDS}")
        self.max_side, self.coord_kind = max_side, coords
        self.table = nn.Parameter(torch.randn(max_side, max_side, dim) * 0.02)

    def forward(self, coords: torch.Tensor, sides: torch.Tensor | None = None) -> torch.Tensor:
        p = positions(coords, sides, max_side=self.max_side, coord_kind=self.coord_kind,
                      resample_beyond_table=True).clamp(0, self.max_side - 1)
        lo = p.floor().long()
        hi = (lo + 1).clamp(max=self.max_side - 1)
        w = (p - lo.float()).to(self.table.dtype)
        wr, wc = w[..., 0:1], w[..., 1:2]
        t = self.table
        return ((1 - wr) * (1 - wc) * t[lo[..., 0], lo[..., 1]] + (1 - wr) * wc * t[lo[..., 0], hi[..., 1]]
                + wr * (1 - wc) * t[hi[..., 0], lo[..., 1]] + wr * wc * t[hi[..., 0], hi[..., 1]])


def build_posemb(*, dim: int, max_side: int, kind: str = "learned", coords: str = "absolute",
                 combine: str = "sum") -> nn.Module:
    """The position embedding named by model.vision.posemb / posemb_coords / posemb_combine."""
    if kind == "learned_2d":
        return LearnedPosEmb2D(dim=dim, max_side=max_side, coords=coords)
    return FactorizedPosEmb(dim=dim, max_side=max_side, kind=kind, coords=coords, combine=combine)
