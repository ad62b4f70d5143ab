"""The backend interface and the packed-attention backends built on torch's SDPA (any device,
any dtype, plain autograd): the written-out reference, SDPA with a dense block-diagonal mask, one
SDPA call per image, and one SDPA call per length bucket of images.

Every backend is callable as `attend(q, k, v, segment)` with q, k, v [S, H, L, Dh] and segment
[S, L] (slot id per token, -1 for padding), and bindable: `bind(segment)` does the per-batch work
once and returns `(q, k, v) -> out` for every block of a forward.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
BoundAttend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


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


class Backend:
    """An attention backend: `bind(segment)` does the per-batch work; calling it runs one attention."""

    name = "backend"

    def bind(self, segment: torch.Tensor) -> BoundAttend:
        raise NotImplementedError

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment: torch.Tensor) -> torch.Tensor:
        return self.bind(segment)(q, k, v)

    def __repr__(self) -> str:
        return f"<attention backend {self.name}>"


class FunctionBackend(Backend):
    def __init__(self, name: str, fn: Attend) -> None:
        self.name, self.fn = name, fn

    def bind(self, segment: torch.Tensor) -> BoundAttend:
        return lambda q, k, v: self.fn(q, k, v, segment)


def image_runs(segment: torch.Tensor) -> list[list[tuple[int, int]]] | None:
    """Per sequence, the (start, length) of each run of equal slot ids, padding runs included.
    None when some slot id occurs in two separate runs (then slicing cannot serve)."""
    seg = segment.detach().cpu()
    change = torch.ones_like(seg, dtype=torch.bool)
    change[:, 1:] = seg[:, 1:] != seg[:, :-1]
    out = []
    for s in range(seg.shape[0]):
        starts = change[s].nonzero().squeeze(1).tolist()
        bounds = [*starts, seg.shape[1]]
        runs = [(a, b - a) for a, b in zip(bounds[:-1], bounds[1:])]
        if len(runs) != len(seg[s].unique()):
            return None
        out.append(runs)
    return out


class PerImageSdpa(Backend):
    """One unmasked SDPA call per image: the sequence split into its image runs, outputs
    concatenated back. Split and unbind, not slicing: their backward concatenates the pieces'
    gradients, where each slice's backward would write its piece into a zero-filled copy of the
    whole input (on CPU that zero-filling took 64% of the time of forward+backward)."""

    name = "sdpa_per_image"

    def bind(self, segment: torch.Tensor) -> BoundAttend:
        runs = image_runs(segment)
        if runs is None:
            return self._bind_gather(segment)
        sizes = [[n for _, n in seq_runs] for seq_runs in runs]

        def attend(q, k, v):
            rows = []
            for lengths, qs, ks, vs in zip(sizes, q.unbind(0), k.unbind(0), v.unbind(0)):  # [H, L, Dh] each
                parts = [F.scaled_dot_product_attention(qi, ki, vi)
                         for qi, ki, vi in zip(qs.split(lengths, 1), ks.split(lengths, 1), vs.split(lengths, 1))]
                rows.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=1))
            return torch.stack(rows)

        return torch.compiler.disable(attend)  # the image runs are Python data: no recompile per batch

    @staticmethod
    def _bind_gather(segment: torch.Tensor) -> BoundAttend:
        """Slot ids scattered over the sequence: gather each image's tokens, scatter results back."""
        groups = [(s, (segment[s] == slot).nonzero().squeeze(1)) for s in range(segment.shape[0])
                  for slot in segment[s].unique().tolist()]

        def attend(q, k, v):
            out = torch.empty_like(q)
            for s, index in groups:
                out[s][:, index] = F.scaled_dot_product_attention(q[s][:, index], k[s][:, index], v[s][:, index])
            return out

        return torch.compiler.disable(attend)


def token_groups(segment: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (order, counts): the S·L token positions sorted by (sequence, slot), padding being a
    slot of its own in each sequence, and the size of each such group, in that order."""
    S, L = segment.shape
    key = torch.arange(S, device=segment.device)[:, None] * (int(segment.max()) + 2) + segment + 1
    _, group, counts = torch.unique(key.flatten(), return_inverse=True, return_counts=True)
    return torch.argsort(group, stable=True), counts


class BucketedSdpa(Backend):
    """Images grouped by length: each group of images whose lengths fall in the same power-of-two
    bucket is padded to the bucket's longest image and goes through one SDPA call, with a key
    mask where an image is shorter. A run of padding is a group of its own, so padding still
    attends to padding only. Cost: a few calls per forward (not one per image), and at most 4×
    Σnᵢ² (not L² per sequence) of attention work."""

    name = "sdpa_bucketed"

    def bind(self, segment: torch.Tensor) -> BoundAttend:
        order, counts = token_groups(segment)
        starts = counts.cumsum(0) - counts
        bucket = torch.ceil(torch.log2(counts.double())).long()
        plans, placed = [], []
        for b in bucket.unique().tolist():
            members = (bucket == b).nonzero().squeeze(1)
            lengths, width = counts[members], int(counts[members].max())
            offsets = torch.arange(width, device=segment.device)
            keep = offsets < lengths[:, None]  # [groups, width]: a real token of the group
            index = order[(starts[members][:, None] + offsets).clamp(max=len(order) - 1)]
            plans.append((index, None if bool(keep.all()) else keep[:, None, None, :], keep.flatten()))
            placed.append(index[keep])
        inverse = torch.argsort(torch.cat(placed))  # from bucket order back to token order

        def attend(q, k, v):
            S, H, L, Dh = q.shape
            tokens = [t.transpose(1, 2).reshape(S * L, H, Dh) for t in (q, k, v)]
            outputs = []
            for index, mask, keep in plans:
                qb, kb, vb = (t[index].transpose(1, 2) for t in tokens)  # [groups, H, width, Dh]
                out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask)
                outputs.append(out.transpose(1, 2).reshape(-1, H, Dh)[keep])
            return torch.cat(outputs)[inverse].reshape(S, L, H, Dh).transpose(1, 2)

        return attend
