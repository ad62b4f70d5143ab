"""Stream PackedBatches to a training rank: shard split, shuffle, size, patchify, tokenize, pack.

Each (rank, worker) reads its own shards with a generator seeded by (seed, rank, worker, epoch),
so the stream is a pure function of the config. Each batch carries its worker's position after
it (plain data, see data/online.py); resuming seeks every worker there instead of replaying the
stream. The stream is endless for training (epochs follow each other), so every rank runs
exactly the number of steps asked for.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import os
import signal
from typing import Iterator, TypeVar

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from navit_clip.batch import PackedBatch
from navit_clip.config import SHARD_KINDS
from navit_clip.data.online import OnlineWorker
from navit_clip.data.packed_worker import PackedWorker
from navit_clip.data.prepacked import shard_holds_packed
from navit_clip.data.shards import (ReadStats, Sample, ShardError, ShardSplit, expand_shards, interleave,
                                    parse_weights, read_samples, split_shards, split_sources)
from navit_clip.data.spec import StreamSpec
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

    def resume_from(self, workers: dict[int, dict], shift: int) -> None:
        """Start each worker at its saved position. `shift`: the worker whose batch is next (the
        DataLoader starts with its first worker, which then plays that worker's part)."""
        self._resume, self._shift = workers, shift

    def __iter__(self) -> Iterator[PackedBatch]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        worker = (worker + getattr(self, "_shift", 0)) % num_workers
        resume = getattr(self, "_resume", {}).get(worker)
        reader = (PackedWorker if self.kind == "packed" else OnlineWorker)(self, worker, num_workers)
        yield from reader.batches(resume)

    def epoch_quota(self, worker: int, num_workers: int) -> int | None:
        """Batches this worker yields per epoch in resampled mode (None: the epoch ends with the data)."""
        sources = self.spec.sources
        if not sources.resampled or sources.steps_per_epoch <= 0:
            return None
        return sources.steps_per_epoch // num_workers + (worker < sources.steps_per_epoch % num_workers)

    def resampled_samples(self, rng: np.random.Generator, stats: ReadStats) -> Iterator[Sample]:
        """One epoch of resampled samples (shards drawn with replacement), shuffled and mixed."""
        streams = [self._resampled(source, rng, stats) for source in self.sources]
        return shuffled(interleave(streams, self.weights, rng), self.spec.shuffle_buffer, rng)

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

    def reader_shards(self, worker: int, num_workers: int) -> list[str]:
        """The shards this (rank, worker) reads: the ones its no-usable-sample error names."""
        if self.spec.sources.resampled:
            return self.shards
        return [shard for source in self.sources
                for shard in split_shards(source, self.rank, self.world, worker, num_workers).shards]


@atexit.register  # registered after multiprocessing's own exit handler, so it runs first
def _kill_leftover_workers() -> None:
    """Workers ignore SIGTERM, which is how multiprocessing stops daemonic children at exit: one
    left running (a loader that was never closed) would hang this process's exit forever."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would report the kill as a failure
    for child in multiprocessing.active_children():
        if child.daemon and child.pid is not None:
            os.kill(child.pid, signal.SIGKILL)
            child.join(timeout=5)


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
    """Batches handed out, with each worker's stream position after its last one, so that a
    checkpoint records where the stream stands and a resume seeks there in constant time.

    The DataLoader takes workers in turn, so batch n came from worker n % W: the position of
    every worker is known exactly. A checkpoint without positions (written before they were
    recorded, or from a resampled stream) is resumed by replaying the stream and skipping the
    batches already trained on.
    """

    def __init__(self, loader: DataLoader, state: dict | None = None) -> None:
        state = state or {}
        skip = int(state.get("batches", 0))
        workers = max(1, loader.num_workers)
        saved = {int(w): s for w, s in (state.get("workers") or {}).items()}
        self.workers: dict[int, dict | None] = dict(saved)
        if state.get("restart"):  # an elastic resume of a resampled stream: the new readers start afresh
            self._iter, self.batches, self.workers = iter(loader), skip, {}
            return
        seekable = all(saved.get(w) is not None and saved[w].get("num_workers") == workers
                       for w in range(min(skip, workers)))
        if skip and seekable:
            log.info("resuming the data stream at batch %d from the saved reader positions", skip)
            loader.dataset.resume_from(saved, shift=skip % workers)
            self._iter, self.batches = iter(loader), skip
            return
        self._iter, self.batches, self.workers = iter(loader), 0, {}
        if skip:
            log.info("resuming the data stream: replaying it and skipping %d batches already trained on", skip)
        for _ in range(skip):
            next(self)

    def __iter__(self) -> "ResumableBatches":
        return self

    def __next__(self) -> PackedBatch:
        try:
            batch = next(self._iter)
        except UserError as exc:
            raise from_worker(exc) from None
        position = batch.stream_state
        worker = position["worker"] if position else self.batches % max(1, self._num_workers)
        self.workers[worker] = position
        self.batches += 1
        return batch

    @property
    def _num_workers(self) -> int:
        return getattr(self._iter, "_num_workers", 0)

    def state_dict(self) -> dict:
        """{"batches": n, "workers": {worker: position or None}} (plain data: ints, lists, dicts)."""
        return {"batches": self.batches, "workers": {str(w): s for w, s in sorted(self.workers.items())}}

    def close(self) -> None:
        """Stop the DataLoader workers now. They ignore SIGTERM (see _ignore_stop_signals), so a
        worker still running when the interpreter exits would hang its exit forever."""
        shutdown = getattr(self._iter, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
