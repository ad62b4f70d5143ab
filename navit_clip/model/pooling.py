"""Pool a packed sequence of L tokens into E_max slots, one per image; empty slots are zeros.

- `MaskedAttentionPool` (MAP): one learned query per head reads each image's tokens. The softmax
  is taken per image with scatter operations, so memory is O(S·L·D) rather than the O(S·E·H·L)
  of a masked [slots × tokens] score matrix.
- `MaskedMeanPool`: the mean of each image's tokens.

Padding tokens (segment -1) go to a scratch slot that is dropped, so they never reach an output.
Per-token outputs for dense tasks are NaViT.forward_tokens (the input of these poolers).
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import nn

from navit_clip.config import POOLINGS


def slot_index(segment: torch.Tensor, max_images: int) -> torch.Tensor:
    """[S, L] slot ids -> [S, L] in 0..max_images, padding mapped to the scratch slot max_images."""
    return torch.where(segment < 0, torch.full_like(segment, max_images), segment)


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
        S, L, D = x.shape
        H = self.heads
        k, v = rearrange(self.kv(self.norm(x)), "s l (two h d) -> two s l h d", two=2, h=H)
        scores = torch.einsum("hd,slhd->slh", self.query, k).float() / math.sqrt(k.shape[-1])  # [S, L, H]
        slot = slot_index(segment, max_images)[:, :, None].expand(S, L, H)
        with torch.no_grad():  # the shift only keeps exp() in range; softmax does not depend on it
            peak = scores.new_full((S, max_images + 1, H), float("-inf")).scatter_reduce(
                1, slot, scores, reduce="amax", include_self=True)
        weights = (scores - peak.gather(1, slot)).exp()
        total = weights.new_zeros(S, max_images + 1, H).scatter_add(1, slot, weights)
        weights = (weights / total.gather(1, slot)).to(v.dtype)  # softmax within each image
        pooled = v.new_zeros(S, max_images + 1, H, v.shape[-1]).scatter_add(
            1, slot[..., None].expand(S, L, H, v.shape[-1]), weights[..., None] * v)[:, :max_images]
        out = self.out(rearrange(pooled, "s e h d -> s e (h d)"))
        empty = ~valid_slots(segment, max_images)
        return out.masked_fill(empty[:, :, None], 0.0)  # after the projection: its bias is not an image


class MaskedMeanPool(nn.Module):
    """Mean of each image's tokens (no parameters)."""

    def forward(self, x: torch.Tensor, segment: torch.Tensor, max_images: int) -> torch.Tensor:
        S, L, D = x.shape
        slot = slot_index(segment, max_images)
        sums = x.new_zeros(S, max_images + 1, D).scatter_add(1, slot[..., None].expand(S, L, D), x)
        counts = x.new_zeros(S, max_images + 1).scatter_add(1, slot, torch.ones_like(x[..., 0]))
        return (sums / counts.clamp(min=1)[..., None])[:, :max_images]


def valid_slots(segment: torch.Tensor, max_images: int) -> torch.Tensor:
    """[S, L] -> [S, E_max] bool: the slot owns at least one token."""
    slot = slot_index(segment, max_images)
    counts = torch.zeros(segment.shape[0], max_images + 1, dtype=torch.long, device=segment.device)
    counts.scatter_add_(1, slot, torch.ones_like(slot))
    return counts[:, :max_images] > 0


def build_pool(kind: str, *, dim: int, heads: int) -> nn.Module:
    """The pooling named by model.vision.pooling (map | mean)."""
    if kind == "map":
        return MaskedAttentionPool(dim=dim, heads=heads)
    if kind == "mean":
        return MaskedMeanPool()
    raise ValueError(f"unknown pooling {kind!r} (model.vision.pooling: one of {', '.join(POOLINGS)})")
