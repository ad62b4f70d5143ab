"""The pre-norm transformer block both towers use; attention is passed in, so the same block
serves packed image attention and causal text attention.

With `checkpointing` on, a block keeps only its input during training and recomputes its inside
in the backward pass: activation memory per block drops from O(L·D·(4 + mlp_ratio)) to O(L·D)
for one extra forward.
"""

from __future__ import annotations

from typing import Callable

import torch
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

AttendFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (q, k, v) -> out


class SelfAttention(nn.Module):
    def __init__(self, *, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, attend: AttendFn) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "b l (three h d) -> three b h l d", three=3, h=self.heads)
        return self.out(rearrange(attend(q, k, v), "b h l d -> b l (h d)"))


class Block(nn.Module):
    def __init__(self, *, dim: int, heads: int, mlp_ratio: float = 4.0, checkpointing: bool = False) -> None:
        super().__init__()
        hidden = round(dim * mlp_ratio)  # round, not int: 1152 * (4304 / 1152) must give 4304
        self.checkpointing = checkpointing
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim=dim, heads=heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, attend: AttendFn) -> torch.Tensor:
        if self.checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x, attend, use_reentrant=False)
        return self._forward(x, attend)

    def _forward(self, x: torch.Tensor, attend: AttendFn) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), attend)
        return x + self.mlp(self.norm2(x))
