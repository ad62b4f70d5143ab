"""One reader's samples of an epoch, with a position that is plain data, so a resume seeks to it.

A reader walks its shards in the epoch's order, mixes its sources by weight and shuffles through
a bounded pool. Its position is the shard order, each source's (shard, sample in shard, sample in
split), which sources still have samples, the pool as sample references (shard, sample in shard)
and its generator's state: a resumed reader skips to the shard, passes over the samples already
read without decoding them and re-reads only the samples its pool held.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any, Callable, Iterator

import numpy as np

from navit_clip.data.shard_files import read_raw
from navit_clip.data.shards import ReadStats, ShardError

log = logging.getLogger(__name__)

#: (shard index into the stream's shard list, sample index in that shard)
Ref = tuple[int, int]
Decode = Callable[[dict[str, Any]], Any]


class SplitReader:
    """Decoded items of one source's split in one epoch's shard order, tracking its position."""

    def __init__(self, paths: list[str], order: list[int], stride: int, offset: int, stats: ReadStats,
                 decode: Decode, skip_errors: tuple[type[Exception], ...], what: str,
                 position: list[int] | None = None) -> None:
        self.paths, self.order, self.stride, self.offset = paths, order, stride, offset
        self.stats, self.decode, self.skip_errors, self.what = stats, decode, skip_errors, what
        self.position = list(position or [0, 0, 0])  # [place in order, samples read of it, samples of the split]
        self._raw: Iterator[dict[str, Any]] | None = None

    def _open(self) -> Iterator[dict[str, Any]]:
        place, skip, index = self.position
        shards = [self.paths[i] for i in self.order[place:]]
        for raw in read_raw(shards, self.stats, self.stride, self.offset, skip=skip, position=index):
            yield raw

    def next_item(self) -> tuple[Ref, Any] | None:
        """The next usable item and its reference, or None when the split is read."""
        if self._raw is None:
            self._raw = self._open()
        for raw in self._raw:
            place = self._place_of(raw)
            index = self.position[2]
            self.position = [place, raw["__member__"] + 1, index + 1]
            if index % self.stride != self.offset:
                continue
            try:
                item = self.decode(raw)
            except self.skip_errors as exc:
                self.stats.skipped[str(exc)] += 1
                log.warning("skipping %s %s in shard %s: %s", self.what, raw.get("__key__"), raw.get("__url__"), exc)
                continue
            self.stats.decoded += 1
            return (self.order[place], raw["__member__"]), item
        return None

    def _place_of(self, raw: dict[str, Any]) -> int:
        """The place in the order of the shard `raw` came from (unreadable shards yield nothing)."""
        place, read = self.position[0], self.position[1]
        url = raw.get("__url__")
        if place < len(self.order) and self.paths[self.order[place]] == url and raw["__member__"] >= read:
            return place
        for later in range(place + 1, len(self.order)):
            if self.paths[self.order[later]] == url:
                return later
        raise RuntimeError(f"sample from unexpected shard {url}")


class PieceReader:
    """Several splits read one after the other: a reader's share of an epoch's unread samples
    after an elastic resume (data/elastic.py). Each piece is a split (shard order, stride, offset)
    and a position in it; its position is the list of pieces not yet finished."""

    def __init__(self, paths: list[str], pieces: list[dict], stats: ReadStats, decode: Decode,
                 skip_errors: tuple[type[Exception], ...], what: str) -> None:
        self.paths, self.stats, self.decode, self.skip_errors, self.what = paths, stats, decode, skip_errors, what
        self.pieces = [{**piece, "position": list(piece["position"])} for piece in pieces]
        self._current: SplitReader | None = None

    @property
    def position(self) -> list[dict]:
        return [{**piece, "position": list(piece["position"])} for piece in self.pieces]

    def next_item(self) -> tuple[Ref, Any] | None:
        """The next usable item of the pieces left, or None when all are read."""
        while self.pieces:
            piece = self.pieces[0]
            if self._current is None:
                self._current = SplitReader(self.paths, piece["order"], piece["stride"], piece["offset"], self.stats,
                                            self.decode, self.skip_errors, self.what, piece["position"])
            item = self._current.next_item()
            piece["position"] = list(self._current.position)
            if item is not None:
                return item
            self.pieces.pop(0)
            self._current = None
        return None


class EpochItems:
    """Sources interleaved by weight (until each is read), shuffled through a pool of `buffer`.

    Draws from `rng` in the same order as a plain interleave-then-shuffle pipeline would."""

    def __init__(self, readers: list[SplitReader], weights: list[float], buffer: int, rng: np.random.Generator,
                 active: list[int] | None = None, pool: list[tuple[Ref, Any]] | None = None,
                 draining: bool = False) -> None:
        self.readers, self.weights, self.buffer, self.rng = readers, weights, buffer, rng
        self.active = list(active) if active is not None else [i for i, w in enumerate(weights) if w > 0]
        self.pool = list(pool or [])
        self.draining = draining

    def _mixed(self) -> Iterator[tuple[Ref, Any]]:
        while self.active:
            if len(self.active) > 1:
                probs = [self.weights[i] for i in self.active]
                total = sum(probs)
                pick = self.active[int(self.rng.choice(len(self.active), p=[p / total for p in probs]))]
            else:
                pick = self.active[0]
            item = self.readers[pick].next_item()
            if item is None:
                self.active.remove(pick)
                continue
            yield item

    def __iter__(self) -> Iterator[tuple[Ref, Any]]:
        pool = self.pool
        if not self.draining:
            for item in self._mixed():
                if self.buffer <= 1:
                    yield item
                    continue
                if len(pool) < self.buffer:
                    pool.append(item)
                    continue
                index = int(self.rng.integers(len(pool)))
                pool[index], item = item, pool[index]
                yield item
            if self.buffer > 1:
                self.rng.shuffle(pool)
            self.draining = True
        while pool:
            yield pool.pop(0)

    def state(self) -> dict:
        return {"readers": [r.position for r in self.readers], "active": list(self.active),
                "pool": [list(ref) for ref, _ in self.pool], "draining": self.draining,
                "rng": self.rng.bit_generator.state}


def generator_from(state: dict) -> np.random.Generator:
    """A generator in the saved state (`bit_generator.state`, plain ints)."""
    rng = np.random.default_rng()
    rng.bit_generator.state = state
    return rng


def fetch(paths: list[str], refs: list[Ref], decode: Decode) -> dict[Ref, Any]:
    """The items at `refs`, re-read from their shards (each shard read once, up to its last ref)."""
    wanted: dict[int, set[int]] = defaultdict(set)
    for shard, member in refs:
        wanted[shard].add(member)
    found: dict[Ref, Any] = {}
    for shard, members in wanted.items():
        last = max(members)
        for raw in read_raw([paths[shard]], ReadStats()):
            member = raw["__member__"]
            if member in members:
                found[(shard, member)] = decode(raw)
            if member >= last:
                break
    missing = [ref for ref in refs if ref not in found]
    if missing:
        shard, member = missing[0]
        raise ShardError(f"cannot resume the data stream: sample {member} of shard {paths[shard]} is gone "
                         f"({len(missing)} saved samples missing); the shards changed since the checkpoint")
    return found
