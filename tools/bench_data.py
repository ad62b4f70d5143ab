"""Data-pipeline benchmark, all in one run:

1. padding of the packer on a real image-size distribution for lookahead buffers of 16/64/256
   examples (against the place-on-arrival packer and one image per sequence), and with
   exact-fill packing (data.packing.exact_fill) at the middle buffer: its padding and how much it
   lowers the mean tokens per image;
2. images/s of one worker for the full online path (read + decode + size + patchify + tokenize
   + drop + pack) against a plain PIL decode + resize of the same images to the same sizes;
3. images/s of reading pre-packed shards of the same images against the online path.

Timed runs are interleaved (A, B, A, B, ...) and the median is reported, since the machine is
shared and noisy.

    python tools/bench_data.py --sizes ../shared/data/image_sizes_laion_aesthetics.csv
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import tarfile
import tempfile
import time
from dataclasses import replace

import numpy as np
from PIL import Image

from navit_clip.config import load_config
from navit_clip.data.dropping import DropPolicy
from navit_clip.data.exact_fill import make_packer
from navit_clip.data.loader import PackedStream
from navit_clip.data.packing import PatchedImage
from navit_clip.data.prepacked import write_packed_shards
from navit_clip.data.resolution import ResolutionPolicy, fit_grid
from navit_clip.data.shard_files import write_shards
from navit_clip.data.spec import stream_spec
from size_csv import read_sizes



def padding_of(tokens: list[tuple[int, int, int]], seq_len: int, max_images: int, buffer: int,
               open_sequences: int = 8, exact_fill: bool = False) -> tuple[float, float, float]:
    """(padding, images per sequence, mean tokens per image) of the emitted sequences. Patches
    are single grey pixels (patch size 1), so exact fill can resize them like real ones."""
    packer = make_packer(seq_len=seq_len, max_images=max_images, sequences_per_batch=8, patch_size=1,
                         open_sequences=open_sequences, buffer_size=buffer, exact_fill=exact_fill)
    text = np.zeros(1, np.int64)
    for i, (n, rows, cols) in enumerate(tokens):
        coords = np.stack(np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij"), -1).reshape(-1, 2)[:n]
        packer.push(PatchedImage(key=str(i), patches=np.zeros((n, 1), np.uint8), coords=coords.astype(np.int64),
                                 grid=(rows, cols), text=text))
    # steady state, as in training: the end of this finite list (flush) is not counted
    mean_tokens = packer.tokens_filled / packer.images_emitted if packer.images_emitted else 0.0
    return packer.padding_fraction, packer.images_per_sequence, mean_tokens


def padding_table(args: argparse.Namespace, sizes: list[tuple[int, int]]) -> None:
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(sizes))
    print(f"== padding: {len(sizes)} images from {args.sizes}, patch {args.patch_size}, "
          f"<= {args.max_tokens} tokens/image, L={args.seq_len}, E_max={args.max_images}")
    settings = {
        "native": (ResolutionPolicy(args.patch_size, args.max_tokens, 10_000), DropPolicy()),
        "native + Beta(1,4)*0.5 drop": (ResolutionPolicy(args.patch_size, args.max_tokens, 10_000),
                                        DropPolicy(kind="beta", beta_a=1, beta_b=4, max_rate=0.5)),
        "sampled [64, max]": (ResolutionPolicy(args.patch_size, args.max_tokens, 10_000, "sampled", 64), DropPolicy()),
        "side_normal [64, max]": (ResolutionPolicy(args.patch_size, args.max_tokens, 10_000, "side_normal", 64),
                                  DropPolicy()),
    }
    middle = args.buffers[len(args.buffers) // 2]
    print(f"{'sizes':<30}{'one/seq':>9}{'arrival':>9}" + "".join(f"{'B=' + str(b):>9}" for b in args.buffers)
          + f"   images/seq at B={middle}   exact fill at B={middle}: padding, mean tokens/image")
    for name, (policy, drop) in settings.items():
        tokens = []
        for i in order:
            rows, cols = policy.grid_for(*sizes[i], rng=rng)
            n = rows * cols
            n = max(1, int(round(n * (1 - drop.rate_for(n, rng))))) if drop.kind != "none" else n
            tokens.append((n, rows, cols))
        one = 1 - np.mean([n for n, _, _ in tokens]) / args.max_tokens
        arrival = padding_of(tokens, args.seq_len, args.max_images, buffer=0)[0]
        row = [padding_of(tokens, args.seq_len, args.max_images, buffer=b) for b in args.buffers]
        _, per_seq, mean = row[len(row) // 2]
        filled, _, filled_mean = padding_of(tokens, args.seq_len, args.max_images, buffer=middle, exact_fill=True)
        print(f"{name:<30}{one:>9.2%}{arrival:>9.2%}" + "".join(f"{p:>9.2%}" for p, _, _ in row)
              + f"   {per_seq:.2f}{filled:>23.2%}, {filled_mean:.1f} ({filled_mean / mean - 1:+.2%})")


def make_raw_shard(directory: str, sizes: list[tuple[int, int]], count: int, seed: int) -> tuple[str, int]:
    """JPEGs of real sizes (scaled to at most 1024 px a side, as web crawls usually store them)."""
    rng = np.random.default_rng(seed)
    samples = []
    for i, index in enumerate(rng.choice(len(sizes), count, replace=False)):
        w, h = sizes[index]
        scale = min(1.0, 1024 / max(w, h))
        w, h = max(16, round(w * scale)), max(16, round(h * scale))
        ys, xs = np.mgrid[0:h, 0:w]
        pixels = (np.stack([xs * 3, ys * 2, xs + ys], -1) + rng.integers(0, 40, (h, w, 3))) % 256
        buffer = io.BytesIO()
        Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="JPEG", quality=90)
        samples.append({"__key__": f"img{i:06d}", "jpg": buffer.getvalue(), "txt": f"a photo number {i} of a scene"})
    paths = write_shards(samples, os.path.join(directory, "raw-%06d.tar"), max_per_shard=count)
    return paths[0], count


def plain_pil(shard: str, patch: int, max_tokens: int) -> int:
    """Baseline: read the tar, PIL-decode each image and resize it to the same patch grid."""
    done = 0
    with tarfile.open(shard) as tar:
        for member in tar:
            if not member.name.endswith(".jpg"):
                continue
            image = Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")
            rows, cols = fit_grid(*image.size, patch, max_tokens, 10_000)
            np.asarray(image.resize((cols * patch, rows * patch), Image.Resampling.BICUBIC, reducing_gap=None))
            done += 1
    return done


def count_images(stream: PackedStream) -> int:
    return sum(batch.num_images for batch in stream)


def speed(args: argparse.Namespace, sizes: list[tuple[int, int]]) -> None:
    with tempfile.TemporaryDirectory() as directory:
        shard, count = make_raw_shard(directory, sizes, args.images, args.seed)
        cfg = load_config(None, [f"model.vision.patch_size={args.patch_size}", "model.vision.max_grid_side=10000",
                                 "model.text.context_length=32", f"data.seq_len={args.seq_len}",
                                 f"data.max_images={args.max_images}", "data.sequences_per_batch=8",
                                 f"data.resolution.max_tokens={args.max_tokens}", "data.resolution.min_tokens=1",
                                 "data.packing.buffer_size=64", "data.drop.kind=beta", "data.drop.beta_a=1",
                                 "data.drop.beta_b=4", "data.drop.max_rate=0.5"])
        spec = replace(stream_spec(cfg), shards=shard, loop=False, shuffle_buffer=0)
        packed_dir = os.path.join(directory, "packed")
        write_packed_shards(PackedStream(spec), os.path.join(packed_dir, "packed-%06d.tar"), 64)
        packed_spec = replace(spec, shards=packed_dir + "/")
        runs = {
            "plain PIL decode+resize": lambda: plain_pil(shard, args.patch_size, args.max_tokens),
            "online decode+size+patchify+tokenize+drop+pack": lambda: count_images(PackedStream(spec)),
            "pre-packed shards": lambda: count_images(PackedStream(packed_spec)),
        }
        times: dict[str, list[float]] = {name: [] for name in runs}
        images: dict[str, int] = {}
        for _ in range(args.repeats):
            for name, run in runs.items():
                start = time.perf_counter()
                images[name] = run()
                times[name].append(time.perf_counter() - start)
        rate = {name: images[name] / statistics.median(t) for name, t in times.items()}
        print(f"\n== speed of one worker (1 process): {count} JPEGs of LAION sizes (long side <= 1024), "
              f"patch {args.patch_size}, <= {args.max_tokens} tokens, L={args.seq_len}, Beta dropping, "
              f"median of {args.repeats} interleaved runs")
        for name in runs:
            print(f"{name:<50}{rate[name]:>9.1f} images/s")
        base, online = rate["plain PIL decode+resize"], rate["online decode+size+patchify+tokenize+drop+pack"]
        print(f"online / plain PIL: {online / base:.2f}x   pre-packed / online: {rate['pre-packed shards'] / online:.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                                                        "image_sizes_laion_aesthetics.csv"))
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--max-images", type=int, default=32)
    parser.add_argument("--buffers", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--images", type=int, default=200, help="images in the speed test")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of the speed test (0: padding only)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    sizes = read_sizes(args.sizes)
    padding_table(args, sizes)
    if args.repeats > 0:
        speed(args, sizes)


if __name__ == "__main__":
    main()
