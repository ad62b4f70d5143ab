"""Pack patchified images into fixed-length sequences: best fit, at most E_max images each.

`pack` packs a finished list (first-fit decreasing); `StreamingPacker` packs an endless stream
and reports the share of token positions it had to pad. With a lookahead buffer of B examples
(`buffer_size`) it fills one sequence at a time: the oldest buffered example goes first (so no
example waits for more than B sequences), and the rest of the sequence is the subset of the buffer
whose token counts fill it best, found exactly by a bitset subset-sum. Without a buffer it keeps
a few sequences open and places each example by best fit as it arrives.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np
import torch

from navit_clip.batch import PackedBatch


@dataclass(eq=False)  # identity: the same key can arrive twice (a looped epoch, a shard given twice)
class PatchedImage:
    key: str
    patches: np.ndarray  # [N, P*P*C] uint8
    coords: np.ndarray  # [N, 2] int64
    grid: tuple[int, int]  # (rows, cols) of the full grid
    text: np.ndarray  # [T] int64 caption token ids
    origin: dict | None = None  # where the stream read it (see data/online.py), to make it again on resume

    @property
    def num_tokens(self) -> int:
        return len(self.patches)


@dataclass(eq=False)  # identity: removing one open sequence must not compare image arrays
class _Sequence:
    capacity: int
    images: list[PatchedImage] = field(default_factory=list)
    used: int = 0

    @property
    def free(self) -> int:
        return self.capacity - self.used

    def add(self, image: PatchedImage) -> None:
        self.images.append(image)
        self.used += image.num_tokens


def _check_fits(image: PatchedImage, seq_len: int) -> None:
    if image.num_tokens > seq_len:
        raise ValueError(f"image {image.key} has {image.num_tokens} patches, more than seq_len={seq_len}; "
                         "lower data.resolution.max_tokens or raise data.seq_len")
    if image.num_tokens < 1:
        raise ValueError(f"image {image.key} has no patches")


def to_packed_batch(sequences: list[list[PatchedImage]], seq_len: int, max_images: int,
                    patch_dim: int, text_len: int) -> PackedBatch:
    """Lay sequences of images out as a PackedBatch; missing tokens and slots are padding."""
    S = len(sequences)
    patches = np.zeros((S, seq_len, patch_dim), dtype=np.uint8)
    coords = np.zeros((S, seq_len, 2), dtype=np.int64)
    segment = np.full((S, seq_len), -1, dtype=np.int64)
    grid = np.zeros((S, max_images, 2), dtype=np.int64)
    valid = np.zeros((S, max_images), dtype=bool)
    text = np.zeros((S, max_images, text_len), dtype=np.int64)
    keys = []
    for s, images in enumerate(sequences):
        if len(images) > max_images:
            raise ValueError(f"sequence {s} holds {len(images)} images, more than max_images={max_images}")
        pos = 0
        for slot, image in enumerate(images):
            n = image.num_tokens
            if pos + n > seq_len:
                raise ValueError(f"sequence {s} overflows seq_len={seq_len} at image {image.key}")
            patches[s, pos:pos + n] = image.patches
            coords[s, pos:pos + n] = image.coords
            segment[s, pos:pos + n] = slot
            grid[s, slot] = image.grid
            valid[s, slot] = True
            text[s, slot, : len(image.text)] = image.text[:text_len]
            pos += n
        keys.append(tuple(image.key for image in images))
    return PackedBatch(
        patches=torch.from_numpy(patches), coords=torch.from_numpy(coords), segment=torch.from_numpy(segment),
        grid=torch.from_numpy(grid), valid=torch.from_numpy(valid), text=torch.from_numpy(text), keys=tuple(keys),
    )


def pack(examples: Iterable[PatchedImage], seq_len: int, max_images: int) -> PackedBatch:
    """Pack all examples into as few sequences as first-fit decreasing finds."""
    examples = list(examples)
    if not examples:
        raise ValueError("pack() needs at least one example")
    sequences: list[_Sequence] = []
    for image in sorted(examples, key=lambda e: -e.num_tokens):
        _check_fits(image, seq_len)
        target = next((s for s in sequences if s.free >= image.num_tokens and len(s.images) < max_images), None)
        if target is None:
            target = _Sequence(seq_len)
            sequences.append(target)
        target.add(image)
    first = examples[0]
    return to_packed_batch([s.images for s in sequences], seq_len, max_images,
                           first.patches.shape[1], len(first.text))


class StreamingPacker:
    """Best-fit packing of a stream into batches of `sequences_per_batch` sequences."""

    def __init__(self, *, seq_len: int, max_images: int, sequences_per_batch: int, open_sequences: int = 8,
                 buffer_size: int = 0) -> None:
        self.seq_len = seq_len
        self.buffer_size = max(0, buffer_size)
        self._buffer: list[PatchedImage] = []  # oldest first
        self.max_images = max_images
        self.sequences_per_batch = sequences_per_batch
        self.open_sequences = max(1, open_sequences)
        self._open: list[_Sequence] = []
        self._closed: list[_Sequence] = []
        self._shape: tuple[int, int] | None = None  # (patch_dim, text_len) of the stream
        self.tokens_emitted = 0
        self.tokens_filled = 0
        self.images_emitted = 0

    @property
    def padding_fraction(self) -> float:
        """Share of emitted token positions that are padding (0 before anything was emitted)."""
        return 1.0 - self.tokens_filled / self.tokens_emitted if self.tokens_emitted else 0.0

    @property
    def images_per_sequence(self) -> float:
        """Mean images per emitted sequence (empty end-of-stream sequences included)."""
        return self.images_emitted * self.seq_len / self.tokens_emitted if self.tokens_emitted else 0.0

    def _close(self, seq: _Sequence) -> None:
        self._open.remove(seq)
        self._closed.append(seq)

    def push(self, image: PatchedImage) -> list[PackedBatch]:
        """Add one image; return the batches that became complete (usually none or one)."""
        self._add(image)
        return self._emit_ready()

    def _add(self, image: PatchedImage) -> None:
        _check_fits(image, self.seq_len)
        self._shape = self._shape or (image.patches.shape[1], len(image.text))
        if self.buffer_size:
            self._buffer.append(image)
            while len(self._buffer) >= self.buffer_size:
                self._fill_from_buffer()
            return
        fits = [s for s in self._open if s.free >= image.num_tokens and len(s.images) < self.max_images]
        if fits:
            target = min(fits, key=lambda s: s.free)
        else:
            if len(self._open) >= self.open_sequences:
                self._close(min(self._open, key=lambda s: s.free))
            target = _Sequence(self.seq_len)
            self._open.append(target)
        target.add(image)
        if target.free == 0 or len(target.images) == self.max_images:
            self._close(target)

    def _fill_from_buffer(self) -> None:
        """Close one sequence: the oldest example plus the buffered subset that best fills the rest."""
        first = self._buffer.pop(0)
        images, taken = self._compose(first)
        seq = _Sequence(self.seq_len)
        for image in images:
            seq.add(image)
        for index in sorted(taken, reverse=True):
            del self._buffer[index]
        self._closed.append(seq)

    def _compose(self, first: PatchedImage) -> tuple[list[PatchedImage], list[int]]:
        """The images of the sequence that starts with `first`, and the buffer indices they take."""
        chosen = best_subset([im.num_tokens for im in self._buffer], self.seq_len - first.num_tokens,
                             self.max_images - 1)
        return [first] + [self._buffer[index] for index in chosen], chosen

    def _emit_ready(self) -> list[PackedBatch]:
        out = []
        while len(self._closed) >= self.sequences_per_batch:
            chunk, self._closed = self._closed[: self.sequences_per_batch], self._closed[self.sequences_per_batch:]
            out.append(self._to_batch(chunk))
        return out

    def _to_batch(self, chunk: list[_Sequence]) -> PackedBatch:
        assert self._shape is not None
        self.tokens_emitted += self.seq_len * self.sequences_per_batch
        self.tokens_filled += sum(s.used for s in chunk)
        self.images_emitted += sum(len(s.images) for s in chunk)
        sequences = [s.images for s in chunk]
        sequences += [[] for _ in range(self.sequences_per_batch - len(chunk))]  # fixed S, also at the end
        return to_packed_batch(sequences, self.seq_len, self.max_images, *self._shape)

    def flush(self) -> list[PackedBatch]:
        """Close every open sequence and return the rest, the last batch padded with empty sequences."""
        self._close_all()
        return list(self._drain())

    def _close_all(self) -> None:
        while self._buffer:
            self._fill_from_buffer()
        for seq in list(self._open):
            self._close(seq)

    def _drain(self) -> Iterator[PackedBatch]:
        while self._closed:
            chunk, self._closed = self._closed[: self.sequences_per_batch], self._closed[self.sequences_per_batch:]
            yield self._to_batch(chunk)

    def pack_stream(self, images: Iterable[PatchedImage], flush: bool = True) -> Iterator[PackedBatch]:
        """Batches one at a time: between two, the packer holds exactly what was not emitted yet,
        so its state after each batch is well defined (see data/packer_state.py)."""
        for image in images:
            self._add(image)
            while len(self._closed) >= self.sequences_per_batch:
                chunk, self._closed = self._closed[: self.sequences_per_batch], self._closed[self.sequences_per_batch:]
                yield self._to_batch(chunk)
        if flush:
            self._close_all()
            yield from self._drain()


def best_subset(sizes: list[int], capacity: int, max_items: int) -> list[int]:
    """Indices of a subset of `sizes` with the largest sum <= capacity and at most max_items items.

    Exact subset-sum over a bitset (bit t of `reach[i]` says the first i sizes can sum to t), at
    a cost of len(sizes) big-integer shifts. Earlier indices are preferred, so older examples
    leave the buffer first. If the best subset holds too many items, a greedy largest-first fill
    within max_items is used instead.
    """
    if capacity <= 0 or max_items <= 0 or not sizes:
        return []
    full = (1 << (capacity + 1)) - 1
    reach = [1]
    for n in sizes:
        reach.append((reach[-1] | (reach[-1] << n)) & full)
    target = reach[-1].bit_length() - 1
    chosen: list[int] = []
    for i in range(len(sizes), 0, -1):
        if target == 0:
            break
        if not (reach[i - 1] >> target) & 1:
            chosen.append(i - 1)
            target -= sizes[i - 1]
    if len(chosen) <= max_items:
        return sorted(chosen)
    greedy, free = [], capacity
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        if sizes[i] <= free and len(greedy) < max_items:
            greedy.append(i)
            free -= sizes[i]
    return sorted(greedy)
