"""Data-stream resume time at two depths: the time from building the resumed stream to its first
batch, with the reader positions a checkpoint saves, at batch 100 and at batch 5,000.

The positions are taken from a real stream advanced that far (many small raw shards, tiny
images, so that 5,000 batches are reached in a minute of CPU); the rest of a resume (model and
optimizer load) does not depend on the step. For comparison the old resume, which replays the
stream and skips the batches already trained on, is timed at the shallow depth.

    python tools/bench_resume.py [--early 100] [--late 5000] [--workers 1]
"""

from __future__ import annotations

import argparse
import io
import itertools
import statistics
import tempfile
import time
from dataclasses import replace

import numpy as np
from PIL import Image

from navit_clip.config import load_config
from navit_clip.data.loader import ResumableBatches, make_loader
from navit_clip.data.shard_files import write_shards
from navit_clip.data.spec import stream_spec

SETTINGS = ["model.vision.patch_size=16", "model.vision.max_grid_side=4", "model.text.context_length=16",
            "data.seq_len=16", "data.max_images=4", "data.sequences_per_batch=1", "data.resolution.max_tokens=4",
            "data.resolution.min_tokens=1", "data.resolution.mode=sampled", "data.packing.buffer_size=8",
            "data.shuffle_buffer=64", "train.seed=0"]


def write_small_shards(directory: str, shards: int, per_shard: int) -> str:
    rng = np.random.default_rng(0)

    def samples():
        for i in range(shards * per_shard):
            width, height = (int(v) for v in rng.integers(16, 48, 2))
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, format="PNG")
            yield {"__key__": f"s{i:07d}", "png": buffer.getvalue(), "txt": f"picture {i}"}

    write_shards(samples(), f"{directory}/s-%05d.tar", max_per_shard=per_shard)
    return f"{directory}/s-{{00000..{shards - 1:05d}}}.tar"


def state_at(spec, batches: int, workers: int) -> dict:
    stream = ResumableBatches(make_loader(spec, num_workers=workers))
    for _ in itertools.islice(stream, batches):
        pass
    state = stream.state_dict()
    stream.close()
    return state


def time_to_first(spec, state: dict, workers: int) -> float:
    start = time.perf_counter()
    stream = ResumableBatches(make_loader(spec, num_workers=workers), state=state)
    next(stream)
    seconds = time.perf_counter() - start
    stream.close()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--early", type=int, default=100)
    parser.add_argument("--late", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--shards", type=int, default=400)
    parser.add_argument("--per-shard", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        spec = replace(stream_spec(load_config(None, SETTINGS)), shards=write_small_shards(
            directory, args.shards, args.per_shard), loop=True)
        start = time.perf_counter()
        states = {depth: state_at(spec, depth, args.workers) for depth in (args.early, args.late)}
        print(f"advanced the stream to batches {args.early} and {args.late} in {time.perf_counter() - start:.1f} s")
        times: dict[int, list[float]] = {args.early: [], args.late: []}
        for _ in range(args.repeats):  # interleaved: the machine is shared and noisy
            for depth, state in states.items():
                times[depth].append(time_to_first(spec, state, args.workers))
        replay = time_to_first(spec, {"batches": args.early}, args.workers)
    early, late = (statistics.median(times[d]) for d in (args.early, args.late))
    print(f"resume to first batch, median of {args.repeats}: batch {args.early}: {early:.3f} s, "
          f"batch {args.late}: {late:.3f} s, ratio {late / early:.2f}")
    print(f"replaying to batch {args.early} instead (checkpoints without reader positions): {replay:.3f} s")


if __name__ == "__main__":
    main()
