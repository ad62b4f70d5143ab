"""CPU time of the training stream per batch, and where it goes: what one data-loader worker
spends reading, decoding, sizing, patchifying, tokenizing and packing, profiled with cProfile.

The stream is the one `navit-clip train` reads for the config (with its overrides); the first
batch is not counted (it opens the shards and builds the tokenizer). The figure is CPU time of
this process, so a busy machine changes it less than wall time, but profiling adds its own
overhead: compare two settings in the same run of this tool, or against each other's output
on a quiet machine.

    python tools/profile_stream.py data.train_shards='data/digits/train-{000000..000007}.tar'
    python tools/profile_stream.py --config configs/compare/square.yaml --batches 20 --top 30
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

from navit_clip.config import load_config
from navit_clip.data.loader import PackedStream
from navit_clip.data.spec import stream_spec


def profile_stream(config: str, overrides: list[str], batches: int) -> tuple[float, pstats.Stats]:
    """-> (CPU seconds per batch, the profile) over `batches` batches after the first."""
    if batches < 1:
        raise SystemExit(f"--batches must be at least 1, got {batches}")
    stream = iter(PackedStream(stream_spec(load_config(config, overrides))))
    next(stream)
    profile = cProfile.Profile()
    started = time.process_time()
    profile.enable()
    for _ in range(batches):
        next(stream)
    profile.disable()
    return (time.process_time() - started) / batches, pstats.Stats(profile)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--batches", type=int, default=40, help="batches profiled (after the first)")
    parser.add_argument("--top", type=int, default=15, help="functions listed, by their own time")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = parser.parse_args()
    per_batch, stats = profile_stream(args.config, args.overrides, args.batches)
    print(f"{per_batch * 1000:.1f} ms of CPU per batch ({args.batches} batches, {args.config})")
    stats.sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
