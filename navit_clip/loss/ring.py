"""The ring traversal of the chunked loss, apart from its math: which text block this rank
holds at each step, fetching the next one while the current one is computed, and carrying a
per-column statistic around with each block until it reaches its owner complete.

Every rank runs the same steps in the same order (dist.RingTransfer matches messages by tag and
order), whatever it computes in between.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from navit_clip import dist

TAG_BLOCK, TAG_STATS, TAG_GRAD = 71, 72, 73


@dataclass
class Carried:
    """A per-column statistic that follows its block one step behind: every rank the block visits
    fills in its own part, merges it with what arrived from the ranks before, and passes it on.
    After a full turn, `home` is the statistic of this rank's own block over all ranks."""

    like: torch.Tensor  # shape, dtype and device of one block's statistic
    start: float  # its value before any rank has added to it
    merge: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (arrived, this rank's part) -> both
    tag: int
    home: torch.Tensor | None = None


@dataclass
class Chunk:
    """Up to chunk_size columns of the block visiting this rank, and where their part of the
    carried statistic goes (None when nothing is carried)."""

    columns: torch.Tensor
    carried: torch.Tensor | None


def _slices(length: int, chunk_size: int) -> Iterator[slice]:
    return (slice(start, min(start + chunk_size, length)) for start in range(0, length, chunk_size))


def ring_chunks(block: torch.Tensor, counts: list[int], chunk_size: int, has_rows: bool,
                carried: Carried | None = None) -> Iterator[Chunk]:
    """Every rank's block, starting from this rank's own `block`, `chunk_size` real columns at a
    time (a block's first counts[owner] rows are real; none are visited on a rank without rows of
    its own). The caller writes each chunk's part of the carried statistic into `chunk.carried`
    before asking for the next chunk. Run it to the end: the last steps complete the transfers.
    Only one block is referenced here at a time, so a visited block is freed once passed on."""
    world, rank = dist.world_size(), dist.rank()
    pending = []
    for step in range(world):
        owner = (rank - step) % world
        incoming = _receive(carried.like, carried.tag) if carried is not None and step > 0 else None
        prefetch = _shift(block, TAG_BLOCK) if step < world - 1 else None
        part = None if carried is None else torch.full_like(carried.like, carried.start)
        for cols in _slices(counts[owner] if has_rows else 0, chunk_size):
            yield Chunk(block[cols], None if part is None else part[cols])
        if carried is not None:
            if incoming is not None:
                part = carried.merge(incoming.wait(), part)
            if world > 1:
                pending.append(dist.RingTransfer(part, None, tag=carried.tag))
            else:
                carried.home = part
        if prefetch is not None:
            block = prefetch.wait()
    if carried is not None and world > 1:
        carried.home = dist.RingTransfer(None, carried.like, tag=carried.tag).wait()
    for transfer in pending:
        transfer.wait()


def _shift(tensor: torch.Tensor, tag: int) -> dist.RingTransfer | None:
    """Send to the next rank and receive the previous rank's tensor of the same shape."""
    return dist.RingTransfer(tensor, tensor, tag=tag) if dist.world_size() > 1 else None


def _receive(like: torch.Tensor, tag: int) -> dist.RingTransfer | None:
    return dist.RingTransfer(None, like, tag=tag) if dist.world_size() > 1 else None
