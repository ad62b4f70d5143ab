"""Padding of the streaming packer on a real image-size distribution, against one image per
padded sequence (what non-packing NaFlex-style towers do at the same token budget).

    python tools/packing_report.py ../shared/data/image_sizes_laion_aesthetics.csv --max-tokens 256 --seq-len 1024
"""

from __future__ import annotations

import argparse

import numpy as np

from navit_clip.data.packing import PatchedImage, StreamingPacker
from navit_clip.data.resolution import ResolutionPolicy
from size_csv import read_sizes



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv")
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--min-tokens", type=int, default=64)
    parser.add_argument("--resolution", choices=["native", "sampled"], default="native")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--max-images", type=int, default=32)
    parser.add_argument("--sequences", type=int, default=8)
    parser.add_argument("--open-sequences", type=int, default=8)
    parser.add_argument("--buffer", type=int, default=64, help="lookahead examples (0: place on arrival)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    sizes = read_sizes(args.csv)
    policy = ResolutionPolicy(patch_size=args.patch_size, max_tokens=args.max_tokens, max_side=10_000,
                              mode=args.resolution, min_tokens=args.min_tokens)
    packer = StreamingPacker(seq_len=args.seq_len, max_images=args.max_images,
                             sequences_per_batch=args.sequences, open_sequences=args.open_sequences,
                             buffer_size=args.buffer)
    empty_text = np.zeros(1, dtype=np.int64)
    tokens = []
    for index in rng.permutation(len(sizes)):
        rows, cols = policy.grid_for(*sizes[index], rng=rng)
        n = rows * cols
        tokens.append(n)
        packer.push(PatchedImage(key=str(index), patches=np.zeros((n, 1), np.uint8),
                                 coords=np.zeros((n, 2), np.int64), grid=(rows, cols), text=empty_text))
    tokens_arr = np.array(tokens)
    baseline_padding = 1 - tokens_arr.mean() / args.max_tokens
    images_per_seq = packer.images_emitted / (packer.tokens_emitted / args.seq_len)
    print(f"{len(sizes)} images from {args.csv}, patch {args.patch_size}, budget {args.max_tokens} tokens "
          f"({args.resolution}), tokens/image p10/p50/p90 = "
          f"{np.percentile(tokens_arr, 10):.0f}/{np.percentile(tokens_arr, 50):.0f}/{np.percentile(tokens_arr, 90):.0f}")
    print(f"packed (L={args.seq_len}, E_max={args.max_images}): padding {packer.padding_fraction:.1%}, "
          f"{images_per_seq:.2f} images per sequence")
    print(f"one image per {args.max_tokens}-token sequence: padding {baseline_padding:.1%}")
    print(f"ratio of wasted tokens, packed / one-per-sequence: {packer.padding_fraction / baseline_padding:.3f}")


if __name__ == "__main__":
    main()
