"""Learned factorized 2-D position embedding: emb(row) + emb(col), NaViT's default.

Factorized tables need 2·G entries instead of G², and an image of any aspect ratio reads the rows
and columns it has: a 2×30 banner and a 30×2 strip use the same tables.
"""

from __future__ import annotations

import torch
from torch import nn


class FactorizedPosEmb(nn.Module):
    def __init__(self, *, dim: int, max_side: int) -> None:
        super().__init__()
        self.max_side = max_side
        self.rows = nn.Parameter(torch.randn(max_side, dim) * 0.02)
        self.cols = nn.Parameter(torch.randn(max_side, dim) * 0.02)

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        """coords [..., 2] (row, col) -> [..., dim]."""
        if coords.numel() and not torch.compiler.is_compiling() and int(coords.max()) >= self.max_side:
            raise ValueError(f"patch coordinate {int(coords.max())} exceeds the position table "
                             f"(model.vision.max_grid_side={self.max_side})")
        return self.rows[coords[..., 0]] + self.cols[coords[..., 1]]
