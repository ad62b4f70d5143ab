"""Masked multi-head attention pooling: one learned query reads each image's tokens into its slot.

A packed sequence of L tokens becomes E_max pooled vectors; a slot attends only to the tokens of
its own image, and an empty slot returns zeros (its row is masked out of the loss anyway).
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import nn


class MaskedAttentionPool(nn.Module):
    def __init__(self, *, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.query = nn.Parameter(torch.randn(heads, dim // heads) * 0.02)
        self.norm = nn.LayerNorm(dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, segment: torch.Tensor, max_images: int) -> torch.Tensor:
        """x [S, L, D], segment [S, L] -> pooled [S, E_max, D]."""
        k, v = rearrange(self.kv(self.norm(x)), "s l (two h d) -> two s h l d", two=2, h=self.heads)
        scores = torch.einsum("hd,shld->shl", self.query, k) / math.sqrt(k.shape[-1])  # [S, H, L]
        slots = torch.arange(max_images, device=segment.device)
        member = segment[:, None, :] == slots[None, :, None]  # [S, E, L]
        scores = scores[:, None].masked_fill(~member[:, :, None], float("-inf"))  # [S, E, H, L]
        empty = ~member.any(dim=-1)  # [S, E]
        weights = scores.masked_fill(empty[:, :, None, None], 0.0).softmax(dim=-1)
        weights = weights.masked_fill(empty[:, :, None, None], 0.0)
        pooled = torch.einsum("sehl,shld->sehd", weights, v)
        out = self.out(rearrange(pooled, "s e h d -> s e (h d)"))
        return out.masked_fill(empty[:, :, None], 0.0)  # after the projection: its bias is not an image
