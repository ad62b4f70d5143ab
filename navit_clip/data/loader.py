"""Stream PackedBatches to a training rank: shard split, shuffle, size, patchify, tokenize, pack.

Each (rank, worker) reads its own shards with a generator seeded by (seed, rank, worker, epoch),
so the stream is a pure function of the config: resuming replays the same stream and skips the
batches already trained on. The stream is endless for training (epochs follow each other), so
every rank runs exactly the number of steps asked for.
"""

from __future__ import annotations

import itertools
import logging
import signal
from collections import Counter
from dataclasses import asdict, replace
from typing import Iterator, TypeVar

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from navit_clip.batch import PackedBatch
from navit_clip.config import SHARD_KINDS
from navit_clip.data.dropping import apply_dropping
from navit_clip.data.exact_fill import make_packer
from navit_clip.data.packing import PatchedImage
from navit_clip.data.patches import to_patched
from navit_clip.data.prepacked import BadSequence, decode_sequence, group, sequences_to_batch, shard_holds_packed
from navit_clip.data.shard_files import read_raw
from navit_clip.data.shards import (ReadStats, Sample, ShardError, ShardSplit, expand_shards, interleave,
                                    parse_weights, read_samples, split_shards, split_sources)
from navit_clip.data.spec import StreamSpec
from navit_clip.data.text import cached_tokenizer
from navit_clip.errors import UserError

log = logging.getLogger(__name__)


T = TypeVar("T")


def shuffled(items: Iterator[T], buffer: int, rng: np.random.Generator) -> Iterator[T]:
    """Reservoir-style shuffle with a bounded buffer (whole-dataset shuffles do not stream)."""
    if buffer <= 1:
        yield from items
        return
    pool: list[T] = []
    for item in items:
        if len(pool) < buffer:
            pool.append(item)
            continue
        index = int(rng.integers(len(pool)))
        pool[index], item = item, pool[index]
        yield item
    rng.shuffle(pool)
    yield from pool


class PackedStream(IterableDataset):
    """IterableDataset of PackedBatches for one rank; DataLoader workers split its shards.

    Raw shards are decoded, sized, patchified, token-dropped and packed here; pre-packed shards
    (`navit-clip pack-shards`) are read as ready sequences. Worker w of W yields the rank's
    batches w, w+W, w+2W, ... (the DataLoader takes workers in turn), which gives each batch its
    training step for the resolution and dropping schedules.
    """

    def __init__(self, spec: StreamSpec, rank: int = 0, world: int = 1) -> None:
        super().__init__()
        self.spec = spec
        self.rank, self.world = rank, world
        self.sources = [expand_shards(source, spec.sources.allow_pipe) for source in split_sources(spec.shards)]
        self.weights = parse_weights(spec.sources.weights, len(self.sources))
        self.shards = [path for source in self.sources for path in source]
        self.kind = self._shard_kind()
        if spec.sources.resampled and self.kind == "packed":
            raise ShardError("data.sources.resampled reads raw shards; pre-packed shards are read in epochs "
                             "(set data.sources.resampled=false)")
        if spec.sources.resampled and not spec.loop:
            raise ValueError("a resampled stream is endless; it cannot be read as a single pass (loop=False)")

    def draft(self, width: int, height: int) -> tuple[int, int]:
        return self.spec.resolution.draft_size(width, height)

    def _shard_kind(self) -> str:
        kind = self.spec.sources.shard_kind
        if kind not in SHARD_KINDS:
            raise ShardError(f"data.sources.shard_kind must be one of {', '.join(SHARD_KINDS)}, got {kind!r}")
        if kind != "auto":
            return kind
        return "packed" if shard_holds_packed(self.shards[0]) else "raw"

    def __iter__(self) -> Iterator[PackedBatch]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        if self.kind == "packed":
            yield from self._packed_batches(worker, num_workers)
        else:
            yield from self._online_batches(worker, num_workers)

    def _epoch_quota(self, worker: int, num_workers: int) -> int | None:
        """Batches this worker yields per epoch in resampled mode (None: the epoch ends with the data)."""
        sources = self.spec.sources
        if not sources.resampled or sources.steps_per_epoch <= 0:
            return None
        return sources.steps_per_epoch // num_workers + (worker < sources.steps_per_epoch % num_workers)

    def _epoch_samples(self, worker: int, num_workers: int, epoch: int, rng: np.random.Generator,
                       stats: ReadStats) -> Iterator[Sample]:
        """This reader's decoded samples for one epoch, shuffled and mixed across sources."""
        spec = self.spec
        if spec.sources.resampled:
            streams = [self._resampled(source, rng, stats) for source in self.sources]
            return shuffled(interleave(streams, self.weights, rng), spec.shuffle_buffer, rng)
        streams = []
        for source in self.sources:
            split = split_shards(source, self.rank, self.world, worker, num_workers)
            order = list(split.shards)
            if spec.shuffle_buffer > 0:
                # Readers that stride through all shards must agree on the order, or they would
                # count positions differently and read some samples twice and others never.
                shared = split.stride > 1
                (np.random.default_rng([spec.seed, epoch]) if shared else rng).shuffle(order)
            streams.append(read_samples(replace(split, shards=tuple(order)), stats, spec.max_image_pixels,
                                        min_side=spec.patch_size, draft=self.draft))
        return shuffled(interleave(streams, self.weights, rng), spec.shuffle_buffer, rng)

    def _resampled(self, source: list[str], rng: np.random.Generator, stats: ReadStats) -> Iterator[Sample]:
        """Endless samples from shards drawn with replacement (every reader may read every shard)."""
        barren = 0  # shards in a row without a usable sample
        while True:
            shard = source[int(rng.integers(len(source)))]
            decoded = stats.decoded
            yield from read_samples(ShardSplit((shard,)), stats, self.spec.max_image_pixels,
                                    min_side=self.spec.patch_size, draft=self.draft)
            barren = barren + 1 if stats.decoded == decoded else 0
            if barren > 2 * len(source) + 8:
                raise stats.no_usable(f"sample in {barren} draws", source)

    def _reader_shards(self, worker: int, num_workers: int) -> list[str]:
        """The shards this (rank, worker) reads: the ones its no-usable-sample error names."""
        if self.spec.sources.resampled:
            return self.shards
        return [shard for source in self.sources
                for shard in split_shards(source, self.rank, self.world, worker, num_workers).shards]

    def _online_batches(self, worker: int, num_workers: int) -> Iterator[PackedBatch]:
        spec = self.spec
        tokenizer = cached_tokenizer(spec.tokenizer, spec.text_len)
        packer = make_packer(seq_len=spec.seq_len, max_images=spec.max_images, patch_size=spec.patch_size,
                             sequences_per_batch=spec.sequences_per_batch, **asdict(spec.packing))
        stats = ReadStats()
        reported: Counter = Counter()
        yielded, truncated = 0, Counter()
        quota = self._epoch_quota(worker, num_workers)
        epochs = itertools.count() if spec.loop else range(1)
        for epoch in epochs:
            rng = np.random.default_rng([spec.seed, self.rank, worker, epoch])
            samples = self._epoch_samples(worker, num_workers, epoch, rng, stats)

            def prepare(sample: Sample) -> PatchedImage:
                step = yielded * num_workers + worker
                image = to_patched(sample, spec.resolution, tokenizer, rng, step, truncated)
                return apply_dropping(image, spec.drop, rng, step)

            in_epoch = 0
            for batch in packer.pack_stream(map(prepare, samples), flush=not spec.loop):
                batch.skipped_by_reason = dict(stats.skipped - reported)
                batch.skipped_samples = sum(batch.skipped_by_reason.values())
                reported = Counter(stats.skipped)
                batch.truncated_captions = truncated["truncated_captions"] - truncated["reported"]
                truncated["reported"] = truncated["truncated_captions"]
                yielded += 1
                in_epoch += 1
                yield batch
                if quota is not None and in_epoch >= quota:
                    break
            if stats.decoded == 0:
                raise stats.no_usable("sample", self._reader_shards(worker, num_workers))

    def _packed_batches(self, worker: int, num_workers: int) -> Iterator[PackedBatch]:
        """Batches from pre-packed shards: split and shuffled by sequence, no decoding."""
        spec = self.spec
        stats = ReadStats()
        reported: Counter = Counter()
        epochs = itertools.count() if spec.loop else range(1)
        for epoch in epochs:
            rng = np.random.default_rng([spec.seed, self.rank, worker, epoch])
            split = split_shards(self.shards, self.rank, self.world, worker, num_workers)
            order = list(split.shards)
            if spec.shuffle_buffer > 0:
                (np.random.default_rng([spec.seed, epoch]) if split.stride > 1 else rng).shuffle(order)
            sequences = self._read_sequences(replace(split, shards=tuple(order)), stats)
            patch_dim = spec.patch_size * spec.patch_size * 3
            for chunk in group(shuffled(sequences, spec.shuffle_buffer, rng), spec.sequences_per_batch,
                               pad_last=not spec.loop):
                batch = sequences_to_batch(chunk, spec.sequences_per_batch, spec.seq_len, spec.max_images,
                                           patch_dim, spec.text_len)
                batch.skipped_by_reason = dict(stats.skipped - reported)
                batch.skipped_samples = sum(batch.skipped_by_reason.values())
                reported = Counter(stats.skipped)
                yield batch
            if stats.decoded == 0:
                raise stats.no_usable("pre-packed sequence", list(split.shards))

    def _read_sequences(self, split: ShardSplit, stats: ReadStats) -> Iterator[dict]:
        spec = self.spec
        for index, raw in enumerate(read_raw(split.shards, stats, split.stride, split.offset)):
            if index % split.stride != split.offset:
                continue
            try:
                seq = decode_sequence(raw, spec.seq_len, spec.max_images, spec.text_len)
            except BadSequence as exc:
                stats.skipped[str(exc)] += 1
                log.warning("skipping packed sequence %s in shard %s: %s", raw.get("__key__"), raw.get("__url__"), exc)
                continue
            if seq["patches"].shape[1] != spec.patch_size * spec.patch_size * 3:
                raise ShardError(f"pre-packed shard {raw.get('__url__')} holds patches of {seq['patches'].shape[1]} "
                                 f"values, but model.vision.patch_size={spec.patch_size} needs "
                                 f"{spec.patch_size ** 2 * 3}")
            stats.decoded += 1
            yield seq


def _ignore_stop_signals(worker_id: int) -> None:
    """Workers leave SIGTERM/SIGINT to the training process, which checkpoints and then stops
    them; a worker that died first would take the run down before it could save."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def from_worker(exc: UserError) -> UserError:
    """A user error raised in a DataLoader worker, as raised there. The DataLoader re-raises it
    in this process with the worker's whole traceback as its message; the user needs one line."""
    text = str(exc)
    if not text.startswith("Caught ") or "DataLoader worker" not in text:
        return exc
    _, found, message = text.rpartition(f"{type(exc).__module__}.{type(exc).__qualname__}: ")
    return type(exc)(message.strip()) if found and message.strip() else exc


def make_loader(spec: StreamSpec, *, rank: int = 0, world: int = 1, num_workers: int = 0) -> DataLoader:
    """A DataLoader yielding ready PackedBatches (the packer already batches)."""
    return DataLoader(PackedStream(spec, rank, world), batch_size=None, num_workers=num_workers,
                      persistent_workers=False, prefetch_factor=4 if num_workers > 0 else None,
                      worker_init_fn=_ignore_stop_signals if num_workers > 0 else None)


class ResumableBatches:
    """Counts the batches handed out, so a checkpoint can record where the stream stands;
    on resume the deterministic stream is replayed and that many batches are skipped."""

    def __init__(self, loader: DataLoader, state: dict | None = None) -> None:
        self._iter = iter(loader)
        self.batches = 0
        skip = int((state or {}).get("batches", 0))
        if skip:
            log.info("resuming the data stream: skipping %d batches already trained on", skip)
        for _ in range(skip):
            next(self)

    def __iter__(self) -> "ResumableBatches":
        return self

    def __next__(self) -> PackedBatch:
        try:
            batch = next(self._iter)
        except UserError as exc:
            raise from_worker(exc) from None
        self.batches += 1
        return batch

    def state_dict(self) -> dict:
        return {"batches": self.batches}

    def close(self) -> None:
        """Stop the DataLoader workers now. They ignore SIGTERM (see _ignore_stop_signals), so a
        worker still running when the interpreter exits would hang its exit forever."""
        shutdown = getattr(self._iter, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
