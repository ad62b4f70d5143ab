"""Exact-fill packing: shrink one image of a sequence so that the sequence has no padding.

At native resolution most web images land on a few token counts near the per-image budget
(247, 252, 256 at 256 tokens), so the best subset of the lookahead buffer often leaves a gap
that no waiting image fits. NaViT's suggestion: shrink an image instead of padding. When the
best subset leaves a gap, the packer also tries shrinking one image, either the sequence's first
(the oldest waiting) or a waiting one placed last after older ones, to a smaller grid that keeps
its aspect ratio within one patch and never exceeds its current size; the rest of the sequence is
again the buffered subset that fits best. A shrink is taken when it costs the image at most
PADDING_WEIGHT tokens for each padding token it removes (score: tokens lost + weight x padding).
Four images of at most 256 tokens fill L=1024 exactly only if all have 256, so on web sizes most
exact fills need a fifth image shrunk to the gap; the weight bounds what that may cost. A whole
image is resized from its own patches (its patches, positions and grid stay consistent); an
image that lost patches to token dropping keeps its grid and drops a few more patches.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from PIL import Image

from navit_clip.data.packing import PatchedImage, StreamingPacker
from navit_clip.data.patches import patchify, unpatchify


@functools.lru_cache(maxsize=4096)
def smaller_grids(rows: int, cols: int, max_loss: int) -> tuple[tuple[int, int], ...]:
    """Grids (r, c) with r <= rows, c <= cols, rows*cols - max_loss <= r*c < rows*cols and the
    aspect ratio within one patch (|c - r*cols/rows| <= 1 and |r - c*rows/cols| <= 1)."""
    full, tolerance = rows * cols, min(rows, cols)
    grids = [(r, c) for r in range(rows, 0, -1) for c in range(cols, 0, -1)
             if full - max_loss <= r * c < full and abs(c * rows - r * cols) <= tolerance]
    return tuple(sorted(grids, key=lambda g: -g[0] * g[1]))


def is_whole(image: PatchedImage) -> bool:
    """Every patch of the grid is present (nothing dropped), so the image can be resized."""
    return image.num_tokens == image.grid[0] * image.grid[1]


PADDING_WEIGHT = 3.0  # a shrink may cost the image up to 3 tokens for each padding token it removes


@dataclass(frozen=True)
class Fill:
    """One image shrunk to `tokens` (to `grid`, or by dropping patches if None) and the rest of
    the sequence: buffer indices `others`; `shrink` is a buffer index, or -1 for the first image."""

    shrink: int
    tokens: int
    grid: tuple[int, int] | None
    others: list[int]
    left: int  # padding that remains
    loss: int  # tokens the shrunk image loses


def _prefix_reach(sizes: list[int], capacity: int) -> list[int]:
    """reach[i]: bit t is set when a subset of sizes[:i] sums to t (t <= capacity)."""
    full = (1 << (capacity + 1)) - 1
    reach = [1]
    for n in sizes:
        reach.append((reach[-1] | (reach[-1] << n)) & full)
    return reach


def _backtrack(reach: list[int], sizes: list[int], end: int, total: int) -> list[int]:
    chosen = []
    for i in range(end, 0, -1):
        if total == 0:
            break
        if not (reach[i - 1] >> total) & 1:
            chosen.append(i - 1)
            total -= sizes[i - 1]
    return sorted(chosen)


def _options(image: PatchedImage, room: int, bits: int, gap: int) -> list[tuple[int, tuple[int, int] | None]]:
    """(tokens, grid) the image may shrink to, losing at most `gap` tokens."""
    if is_whole(image):
        return [(r * c, (r, c)) for r, c in smaller_grids(*image.grid, gap)]
    # a dropped image can lose any number of patches: the smallest subset sum that leaves it
    # fewer than its tokens fills the room exactly with the least loss
    low = room - image.num_tokens + 1
    above = bits >> max(low, 0)
    if not above:
        return []
    total = max(low, 0) + ((above & -above).bit_length() - 1)
    tokens = room - total
    return [(tokens, None)] if 1 <= tokens and image.num_tokens - tokens <= gap else []


def plan_fill(first: PatchedImage, buffer: list[PatchedImage], seq_len: int, max_images: int, gap: int,
              padding_weight: float = PADDING_WEIGHT) -> Fill | None:
    """The shrink that fills a sequence starting with `first` best, or None if none beats a `gap`
    of padding (score: tokens lost + padding_weight * padding left, then padding left)."""
    sizes = [image.num_tokens for image in buffer]
    reach = _prefix_reach(sizes, seq_len)
    best, best_key = None, (padding_weight * gap, gap)
    candidates = [(-1, first, seq_len, len(sizes))]
    candidates += [(i, image, seq_len - first.num_tokens, i) for i, image in enumerate(buffer)]
    for index, image, room, end in candidates:
        for tokens, grid in _options(image, room, reach[end], int(padding_weight * gap)):
            target = room - tokens
            if target < 0:
                continue
            total = (reach[end] & ((1 << (target + 1)) - 1)).bit_length() - 1
            left, loss = target - total, image.num_tokens - tokens
            key = (loss + padding_weight * left, left)
            if key < best_key:
                best_key, best = key, (index, tokens, grid, end, total, left, loss)
    if best is None:
        return None
    index, tokens, grid, end, total, left, loss = best
    others = _backtrack(reach, sizes, end, total)
    if len(others) + (1 if index < 0 else 2) > max_images:
        return None
    return Fill(index, tokens, grid, others, left, loss)


def shrink(image: PatchedImage, tokens: int, grid: tuple[int, int] | None, patch_size: int) -> PatchedImage:
    """The image with `tokens` patches: resized to `grid` from its own pixels, or (grid None, an
    image with dropped patches) keeping `tokens` of its patches spread evenly over them."""
    origin = None if image.origin is None else {**image.origin, "shrink": [tokens, list(grid) if grid else None]}
    if grid is None:
        kept = (np.arange(tokens) * image.num_tokens) // tokens
        return replace(image, patches=image.patches[kept], coords=image.coords[kept], origin=origin)
    rows, cols = image.grid
    channels = image.patches.shape[1] // (patch_size * patch_size)
    pixels = unpatchify(image.patches, rows, cols, patch_size, channels)
    picture = Image.fromarray(pixels[:, :, 0] if channels == 1 else pixels)
    patches, coords = patchify(picture, *grid, patch_size)
    return replace(image, patches=patches, coords=coords, grid=grid, origin=origin)


class ExactFillPacker(StreamingPacker):
    """The lookahead packer, shrinking one image of a sequence when that removes its padding."""

    def __init__(self, *, patch_size: int, padding_weight: float = PADDING_WEIGHT, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.padding_weight = padding_weight
        if self.buffer_size <= 0:
            raise ValueError("exact-fill packing needs a lookahead buffer (buffer_size > 0)")
        self.patch_size = patch_size
        self.images_shrunk = 0
        self.tokens_shrunk = 0

    def _compose(self, first: PatchedImage) -> tuple[list[PatchedImage], list[int]]:
        images, taken = super()._compose(first)
        gap = self.seq_len - sum(image.num_tokens for image in images)
        if gap <= 0:
            return images, taken
        fill = plan_fill(first, self._buffer, self.seq_len, self.max_images, gap, self.padding_weight)
        if fill is None:
            return images, taken
        source = first if fill.shrink < 0 else self._buffer[fill.shrink]
        shrunk = shrink(source, fill.tokens, fill.grid, self.patch_size)
        self.images_shrunk += 1
        self.tokens_shrunk += fill.loss
        others = [self._buffer[i] for i in fill.others]
        if fill.shrink < 0:
            return [shrunk] + others, fill.others
        return [first] + others + [shrunk], fill.others + [fill.shrink]


def make_packer(*, seq_len: int, max_images: int, sequences_per_batch: int, patch_size: int,
                open_sequences: int = 8, buffer_size: int = 0, exact_fill: bool = False) -> StreamingPacker:
    """The packer `data.packing` describes (its keys are this function's last three arguments)."""
    args = dict(seq_len=seq_len, max_images=max_images, sequences_per_batch=sequences_per_batch,
                open_sequences=open_sequences, buffer_size=buffer_size)
    return ExactFillPacker(patch_size=patch_size, **args) if exact_fill else StreamingPacker(**args)
