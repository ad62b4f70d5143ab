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
from dataclasses import dataclass, replace
from typing import Iterator

import numpy as np
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from navit_clip.batch import PackedBatch
from navit_clip.data.packing import PatchedImage, StreamingPacker
from navit_clip.data.patches import patchify
from navit_clip.data.resolution import ResolutionPolicy
from navit_clip.data.shards import ReadStats, Sample, expand_shards, read_samples, split_shards
from navit_clip.data.text import CaptionTokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamSpec:
    """Everything one packed stream needs; built from the config by `stream_spec`."""

    shards: str
    patch_size: int
    max_side: int
    text_len: int
    seq_len: int
    max_images: int
    sequences_per_batch: int
    max_tokens: int
    min_tokens: int = 1
    resolution: str = "native"
    open_sequences: int = 8
    shuffle_buffer: int = 0  # 0 = keep shard order (evaluation)
    loop: bool = True  # endless epochs (training) or a single pass (evaluation)
    seed: int = 0
    max_image_pixels: int = 64_000_000


def shuffled(items: Iterator[Sample], buffer: int, rng: np.random.Generator) -> Iterator[Sample]:
    """Reservoir-style shuffle with a bounded buffer (whole-dataset shuffles do not stream)."""
    if buffer <= 1:
        yield from items
        return
    pool: list[Sample] = []
    for item in items:
        if len(pool) < buffer:
            pool.append(item)
            continue
        index = int(rng.integers(len(pool)))
        pool[index], item = item, pool[index]
        yield item
    rng.shuffle(pool)
    yield from pool


def patch_image(key: str, image: Image.Image, policy: ResolutionPolicy, text: np.ndarray,
                rng: np.random.Generator | None = None) -> PatchedImage:
    """Size an RGB image by the policy and cut it into patches."""
    rows, cols = policy.grid_for(*image.size, rng=rng)
    patches, coords = patchify(image, rows, cols, policy.patch_size)
    return PatchedImage(key=key, patches=patches, coords=coords, grid=(rows, cols), text=text)


def to_patched(sample: Sample, policy: ResolutionPolicy, tokenizer: CaptionTokenizer,
               rng: np.random.Generator | None) -> PatchedImage:
    return patch_image(sample.key, sample.image, policy, tokenizer([sample.caption])[0], rng)


class PackedStream(IterableDataset):
    """IterableDataset of PackedBatches for one rank; DataLoader workers split its shards."""

    def __init__(self, spec: StreamSpec, rank: int = 0, world: int = 1) -> None:
        super().__init__()
        self.spec = spec
        self.rank, self.world = rank, world
        self.shards = expand_shards(spec.shards)

    def __iter__(self) -> Iterator[PackedBatch]:
        spec = self.spec
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        split = split_shards(self.shards, self.rank, self.world, worker, num_workers)
        policy = ResolutionPolicy(patch_size=spec.patch_size, max_tokens=spec.max_tokens, max_side=spec.max_side,
                                  mode=spec.resolution, min_tokens=spec.min_tokens)
        tokenizer = CaptionTokenizer(spec.text_len)
        packer = StreamingPacker(seq_len=spec.seq_len, max_images=spec.max_images,
                                 sequences_per_batch=spec.sequences_per_batch, open_sequences=spec.open_sequences)
        stats = ReadStats()
        reported_skips = 0
        epochs = itertools.count() if spec.loop else range(1)
        for epoch in epochs:
            rng = np.random.default_rng([spec.seed, self.rank, worker, epoch])
            order = list(split.shards)
            if spec.shuffle_buffer > 0:
                # Readers that stride through all shards must agree on the order, or they would
                # count positions differently and read some samples twice and others never.
                shared = split.stride > 1
                (np.random.default_rng([spec.seed, epoch]) if shared else rng).shuffle(order)
            samples = read_samples(replace(split, shards=tuple(order)), stats, spec.max_image_pixels)
            images = (to_patched(s, policy, tokenizer, rng) for s in shuffled(samples, spec.shuffle_buffer, rng))
            for batch in packer.pack_stream(images, flush=not spec.loop):
                batch.skipped_samples = stats.num_skipped - reported_skips
                reported_skips = stats.num_skipped
                yield batch
            if stats.decoded == 0:
                raise RuntimeError(f"no usable sample in shards {list(split.shards)} "
                                   f"(skipped: {dict(stats.skipped)})")


def _ignore_stop_signals(worker_id: int) -> None:
    """Workers leave SIGTERM/SIGINT to the training process, which checkpoints and then stops
    them; a worker that died first would take the run down before it could save."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


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
            next(self._iter)
            self.batches += 1

    def __iter__(self) -> "ResumableBatches":
        return self

    def __next__(self) -> PackedBatch:
        batch = next(self._iter)
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
