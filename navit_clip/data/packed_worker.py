"""One (rank, worker)'s batches from pre-packed shards, and its position as plain data after each.

Sequences are split and shuffled like raw samples, but need no decoding: a resume skips to the
shard, passes over the sequences already read and re-reads only those its shuffle pool held.
"""

from __future__ import annotations

import itertools
import logging
from collections import Counter
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from navit_clip.batch import PackedBatch
from navit_clip.data.online import read_stats_from, read_stats_state
from navit_clip.data.prepacked import BadSequence, decode_sequence, group, sequences_to_batch
from navit_clip.data.reader import EpochItems, PieceReader, SplitReader, fetch, generator_from
from navit_clip.data.shards import ReadStats, ShardError, split_shards

if TYPE_CHECKING:
    from navit_clip.data.loader import PackedStream

log = logging.getLogger(__name__)


class PackedWorker:
    """Read, shuffle and batch one reader's pre-packed sequences, epoch after epoch."""

    def __init__(self, stream: PackedStream, worker: int, num_workers: int) -> None:
        self.stream, self.spec = stream, stream.spec
        self.worker, self.num_workers = worker, num_workers
        self.stats, self.reported = ReadStats(), Counter()
        self.epoch = 0
        self.order: list[int] = []
        self.split = [1, 0]  # [stride, offset]
        self.items: EpochItems | None = None
        self.elastic_pass = False  # reading the pieces an elastic resume dealt to this reader

    def decode(self, raw: dict[str, Any]) -> dict[str, Any]:
        spec = self.spec
        seq = decode_sequence(raw, spec.seq_len, spec.max_images, spec.text_len)
        if seq["patches"].shape[1] != spec.patch_size * spec.patch_size * 3:
            raise ShardError(f"pre-packed shard {raw.get('__url__')} holds patches of {seq['patches'].shape[1]} "
                             f"values, but model.vision.patch_size={spec.patch_size} needs "
                             f"{spec.patch_size ** 2 * 3}")
        return seq

    def _items(self, rng: np.random.Generator, state: dict | None = None) -> EpochItems:
        if self.elastic_pass:
            reader = PieceReader(self.stream.shards, state["readers"][0], self.stats, self.decode, (BadSequence,),
                                 "packed sequence")
        else:
            reader = SplitReader(self.stream.shards, self.order, self.split[0], self.split[1], self.stats,
                                 self.decode, (BadSequence,), "packed sequence", state["readers"][0] if state else None)
        if state is None:
            return EpochItems([reader], [1.0], self.spec.shuffle_buffer, rng)
        refs = [tuple(ref) for ref in state["pool"]]
        found = fetch(self.stream.shards, refs, self.decode)
        return EpochItems([reader], [1.0], self.spec.shuffle_buffer, rng, state.get("active"),
                          [(ref, found[ref]) for ref in refs], state["draining"])

    def _new_epoch(self, epoch: int) -> None:
        spec, stream = self.spec, self.stream
        self.epoch, self.elastic_pass = epoch, False
        rng = np.random.default_rng([spec.seed, stream.rank, self.worker, epoch])
        split = split_shards(list(range(len(stream.shards))), stream.rank, stream.world, self.worker,
                             self.num_workers)
        self.split, self.order = [split.stride, split.offset], list(split.shards)
        if spec.shuffle_buffer > 0:
            (np.random.default_rng([spec.seed, epoch]) if split.stride > 1 else rng).shuffle(self.order)
        self.items = self._items(rng)

    def batches(self, resume: dict | None = None) -> Iterator[PackedBatch]:
        spec = self.spec
        if resume is not None:
            self.restore(resume)
        patch_dim = spec.patch_size * spec.patch_size * 3
        epochs = itertools.count(self.epoch) if spec.loop else range(self.epoch, 1)
        for epoch in epochs:
            if self.items is None or self.epoch != epoch:
                self._new_epoch(epoch)
            sequences = (seq for _, seq in self.items)
            for chunk in group(sequences, spec.sequences_per_batch, pad_last=not spec.loop):
                batch = sequences_to_batch(chunk, spec.sequences_per_batch, spec.seq_len, spec.max_images,
                                           patch_dim, spec.text_len)
                batch.skipped_by_reason = dict(self.stats.skipped - self.reported)
                batch.skipped_samples = sum(batch.skipped_by_reason.values())
                self.reported = Counter(self.stats.skipped)
                batch.stream_state = self.state()
                yield batch
            if self.stats.decoded == 0 and not self.elastic_pass:  # a share of an epoch's rest may be empty
                raise self.stats.no_usable("pre-packed sequence", [self.stream.shards[i] for i in self.order])
            self.items = None

    def state(self) -> dict | None:
        if self.items is None:
            return None
        return {"kind": "packed", "worker": self.worker, "num_workers": self.num_workers, "epoch": self.epoch,
                "order": self.order, "split": self.split, "items": self.items.state(),
                "stats": read_stats_state(self.stats), "reported": dict(self.reported),
                **({"pass": "elastic"} if self.elastic_pass else {})}

    def restore(self, state: dict) -> None:
        """Seek to a saved position: shards skipped, read sequences passed over, the pool re-read."""
        if state.get("elastic"):
            self.start_elastic(state)
            return
        items = state["items"]
        self.elastic_pass = state.get("pass") == "elastic"
        place, skip, _ = items["readers"][0] if not self.elastic_pass else (0, 0, 0)
        log.info("restoring data stream: rank %d worker %d: epoch %d, shard %d/%d, skipping %d sequences, "
                 "re-reading %d pooled", self.stream.rank, self.worker, state["epoch"], place + 1,
                 len(state["order"]), skip, len(items["pool"]))
        self.epoch, self.order, self.split = state["epoch"], list(state["order"]), list(state["split"])
        self.stats = read_stats_from(state["stats"])
        self.items = self._items(generator_from(items["rng"]), items)
        self.reported = Counter(state["reported"])

    def start_elastic(self, state: dict) -> None:
        """Start on the share of an epoch's rest an elastic resume dealt to this reader
        (data/elastic.py): its pieces, and its in-flight sequences in the shuffle pool."""
        log.info("elastic resume of the data stream: rank %d worker %d reads %d pieces of epoch %d and %d requeued "
                 "sequences", self.stream.rank, self.worker, len(state["pieces"][0]), state["epoch"], len(state["pool"]))
        self.epoch, self.order, self.split, self.elastic_pass = state["epoch"], [], [1, 0], True
        rng = np.random.default_rng([self.spec.seed, self.stream.rank, self.worker, self.epoch, self.stream.world])
        self.items = self._items(rng, {"readers": state["pieces"], "pool": state["pool"], "draining": False})
