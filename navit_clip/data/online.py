"""One (rank, worker)'s batches from raw shards, and its position as plain data after each batch.

Each sample is sized and token-dropped with its own generator, seeded by (seed, rank, worker,
epoch, its serial number in the epoch), so an image the packer still held at a checkpoint is
made again, identical, from its reference: (shard, sample in shard, epoch, serial, step).
"""

from __future__ import annotations

import itertools
import logging
from collections import Counter
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from navit_clip.batch import PackedBatch
from navit_clip.data.augment import random_crop
from navit_clip.data.dropping import apply_dropping
from navit_clip.data.exact_fill import make_packer
from navit_clip.data.packer_state import packer_state, restore_packer
from navit_clip.data.packing import PatchedImage
from navit_clip.data.patches import to_patched
from navit_clip.data.elastic import packer_refs
from navit_clip.data.reader import EpochItems, PieceReader, SplitReader, fetch, generator_from
from navit_clip.data.shards import BadSample, ReadStats, Sample, decode_sample, split_shards
from navit_clip.data.text import cached_tokenizer

if TYPE_CHECKING:
    from navit_clip.data.loader import PackedStream

log = logging.getLogger(__name__)


def read_stats_state(stats: ReadStats) -> dict:
    return {"decoded": stats.decoded, "skipped": dict(stats.skipped), "unreadable": dict(stats.unreadable)}


def read_stats_from(state: dict) -> ReadStats:
    return ReadStats(int(state["decoded"]), Counter(state["skipped"]), dict(state["unreadable"]))


class OnlineWorker:
    """Decode, size, patchify, tokenize and pack one reader's samples, epoch after epoch."""

    def __init__(self, stream: PackedStream, worker: int, num_workers: int) -> None:
        self.stream, self.spec = stream, stream.spec
        self.worker, self.num_workers = worker, num_workers
        spec = self.spec
        self.tokenizer = cached_tokenizer(spec.tokenizer, spec.text_len)
        self.packer = make_packer(seq_len=spec.seq_len, max_images=spec.max_images, patch_size=spec.patch_size,
                                  sequences_per_batch=spec.sequences_per_batch, **asdict(spec.packing))
        self.stats, self.reported, self.truncated = ReadStats(), Counter(), Counter()
        self.yielded, self.epoch, self.in_epoch, self.serial = 0, 0, 0, 0
        self.orders: list[list[int]] = []
        self.splits: list[list[int]] = []  # each source's [stride, offset]
        self.items: EpochItems | Iterator | None = None
        self.elastic_pass = False  # reading the pieces an elastic resume dealt to this reader

    # ------------------------------------------------------------------ samples

    def decode(self, raw: dict[str, Any]) -> Sample:
        return decode_sample(raw, self.spec.max_image_pixels, self.spec.patch_size, self.stream.draft)

    def prepare(self, ref: tuple[int, int] | None, sample: Sample, epoch: int, serial: int, step: int) -> PatchedImage:
        spec = self.spec
        rng = np.random.default_rng([spec.seed, self.stream.rank, self.worker, epoch, serial])
        image = to_patched(random_crop(sample, spec.augment, rng), spec.resolution, self.tokenizer, rng, step, self.truncated)
        image = apply_dropping(image, spec.drop, rng, step)
        if ref is not None:
            image.origin = {"shard": ref[0], "member": ref[1], "epoch": epoch, "serial": serial, "step": step}
        return image

    def _epoch_orders(self, rng: np.random.Generator) -> list[list[int]]:
        """Each source's shards (indices into the stream's shard list) in this epoch's order."""
        stream, spec = self.stream, self.spec
        orders, start = [], 0
        self.splits = []
        for source in stream.sources:
            split = split_shards(list(range(start, start + len(source))), stream.rank, stream.world,
                                 self.worker, self.num_workers)
            self.splits.append([split.stride, split.offset])
            order = list(split.shards)
            if spec.shuffle_buffer > 0:
                # Readers that stride through all shards must agree on the order, or they would
                # count positions differently and read some samples twice and others never.
                (np.random.default_rng([spec.seed, self.epoch]) if split.stride > 1 else rng).shuffle(order)
            orders.append(order)
            start += len(source)
        return orders

    def _items(self, rng: np.random.Generator, state: dict | None = None) -> EpochItems:
        stream = self.stream
        if self.elastic_pass:
            readers = [PieceReader(stream.shards, pieces, self.stats, self.decode, (BadSample,), "sample")
                       for pieces in state["readers"]]
        else:
            readers = [SplitReader(stream.shards, order, stride, offset, self.stats, self.decode, (BadSample,),
                                   "sample", state["readers"][number] if state else None)
                       for number, (order, (stride, offset)) in enumerate(zip(self.orders, self.splits))]
        if state is None:
            return EpochItems(readers, stream.weights, self.spec.shuffle_buffer, rng)
        pool_refs = [tuple(ref) for ref in state["pool"]]
        found = fetch(stream.shards, pool_refs, self.decode)
        return EpochItems(readers, stream.weights, self.spec.shuffle_buffer, rng, state["active"],
                          [(ref, found[ref]) for ref in pool_refs], state["draining"])

    # ------------------------------------------------------------------ batches

    def batches(self, resume: dict | None = None) -> Iterator[PackedBatch]:
        spec = self.spec
        if resume is not None:
            self.restore(resume)
        epochs = itertools.count(self.epoch) if spec.loop else range(self.epoch, 1)
        for epoch in epochs:
            if self.items is None or self.epoch != epoch:
                self.epoch, self.in_epoch, self.serial, self.elastic_pass = epoch, 0, 0, False
                rng = np.random.default_rng([spec.seed, self.stream.rank, self.worker, epoch])
                if spec.sources.resampled:
                    self.items = ((None, sample) for sample in self.stream.resampled_samples(rng, self.stats))
                else:
                    self.orders = self._epoch_orders(rng)
                    self.items = self._items(rng)
            images = (self._next_image(ref, sample) for ref, sample in self.items)
            quota = self.stream.epoch_quota(self.worker, self.num_workers)
            for batch in self.packer.pack_stream(images, flush=not spec.loop):
                yield self._finish(batch)
                if quota is not None and self.in_epoch >= quota:
                    break
            if self.stats.decoded == 0 and not self.elastic_pass:  # a share of an epoch's rest may be empty
                raise self.stats.no_usable("sample", self.stream.reader_shards(self.worker, self.num_workers))
            self.items = None

    def _next_image(self, ref: tuple[int, int] | None, sample: Sample) -> PatchedImage:
        step = self.yielded * self.num_workers + self.worker
        image = self.prepare(ref, sample, self.epoch, self.serial, step)
        self.serial += 1
        return image

    def _finish(self, batch: PackedBatch) -> PackedBatch:
        batch.skipped_by_reason = dict(self.stats.skipped - self.reported)
        batch.skipped_samples = sum(batch.skipped_by_reason.values())
        self.reported = Counter(self.stats.skipped)
        batch.truncated_captions = self.truncated["truncated_captions"] - self.truncated["reported"]
        self.truncated["reported"] = self.truncated["truncated_captions"]
        self.yielded += 1
        self.in_epoch += 1
        batch.stream_state = self.state()
        return batch

    # ------------------------------------------------------------------ position

    def state(self) -> dict | None:
        """Where this reader stands after its last batch (None: a stream that cannot seek)."""
        packer = packer_state(self.packer)
        if packer is None or not isinstance(self.items, EpochItems):
            return None
        return {"kind": "raw", "worker": self.worker, "num_workers": self.num_workers, "epoch": self.epoch,
                "yielded": self.yielded, "in_epoch": self.in_epoch, "serial": self.serial, "orders": self.orders,
                "splits": self.splits, "items": self.items.state(), "packer": packer, "stats": read_stats_state(self.stats),
                "reported": dict(self.reported), "truncated": dict(self.truncated),
                **({"pass": "elastic"} if self.elastic_pass else {})}

    def restore(self, state: dict) -> None:
        """Seek to a saved position: shards skipped, read samples passed over, buffers re-read."""
        if state.get("elastic"):
            self.start_elastic(state)
            return
        items = state["items"]
        self.elastic_pass = state.get("pass") == "elastic"
        log.info("restoring data stream: rank %d worker %d: epoch %d, shards at %s, re-reading %d pooled and "
                 "%d packer samples", self.stream.rank, self.worker, state["epoch"],
                 [f"{p[0] + 1}/{len(o)} skipping {p[1]}" for p, o in zip(items["readers"], state["orders"])],
                 len(items["pool"]), sum(1 for _ in packer_refs(state["packer"])))
        self.epoch, self.in_epoch, self.serial = state["epoch"], state["in_epoch"], state["serial"]
        self.yielded = state["yielded"]
        self.orders = [list(order) for order in state["orders"]]
        self.splits = [list(split) for split in state["splits"]]
        self.items = self._items(generator_from(items["rng"]), items)
        restore_packer(self.packer, state["packer"], self._remake)
        self.stats = read_stats_from(state["stats"])
        for reader in self.items.readers:
            reader.stats = self.stats
        self.reported, self.truncated = Counter(state["reported"]), Counter(state["truncated"])

    def start_elastic(self, state: dict) -> None:
        """Start on the share of an epoch's rest an elastic resume dealt to this reader
        (data/elastic.py): its pieces, and its in-flight samples in the shuffle pool."""
        log.info("elastic resume of the data stream: rank %d worker %d reads %d pieces of epoch %d and %d requeued "
                 "samples", self.stream.rank, self.worker, sum(len(p) for p in state["pieces"]), state["epoch"],
                 len(state["pool"]))
        self.epoch, self.in_epoch, self.serial, self.yielded = state["epoch"], 0, 0, state["yielded"]
        self.orders, self.splits, self.elastic_pass = [], [], True
        rng = np.random.default_rng([self.spec.seed, self.stream.rank, self.worker, self.epoch, self.stream.world])
        self.items = self._items(rng, {"readers": state["pieces"], "pool": state["pool"], "active": None,
                                       "draining": False})

    def _remake(self, origins: list[dict]) -> list[PatchedImage]:
        """The packer's images made again from their references, in the order given."""
        refs = [(o["shard"], o["member"]) for o in origins]
        found = fetch(self.stream.shards, refs, self.decode)
        return [self.prepare(ref, found[ref], o["epoch"], o["serial"], o["step"]) for ref, o in zip(refs, origins)]

