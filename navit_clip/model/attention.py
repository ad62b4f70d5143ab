"""Packed attention: every token attends only to tokens of its own image.

All backends share one signature, `attend(q, k, v, segment) -> out` with q, k, v of shape
[S, H, L, Dh] and segment [S, L] (slot id per token, -1 for padding), and pass the same tests
against `reference_attend`. Padding tokens attend to padding (never to an image), so no row is
empty and no NaN appears.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def same_segment_mask(segment: torch.Tensor) -> torch.Tensor:
    """[S, L] -> [S, 1, L, L] bool: True where query and key belong to the same image."""
    return (segment[:, :, None] == segment[:, None, :])[:, None]


def reference_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment: torch.Tensor) -> torch.Tensor:
    """Plain softmax(QKᵀ/√d + mask) V, written out: the ground truth for every other backend."""
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~same_segment_mask(segment), float("-inf"))
    return scores.softmax(dim=-1) @ v


def sdpa_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment: torch.Tensor) -> torch.Tensor:
    """torch's scaled_dot_product_attention with a block-diagonal boolean mask (any device)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=same_segment_mask(segment))


BACKENDS: dict[str, Attend] = {"reference": reference_attend, "sdpa": sdpa_attend}


def get_attend(name: str = "auto") -> Attend:
    """The named backend; `auto` picks the fastest one available here."""
    if name == "auto":
        return sdpa_attend
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r} (known: auto, {', '.join(BACKENDS)})")
    return BACKENDS[name]
