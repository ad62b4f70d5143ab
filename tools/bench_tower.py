"""Speed of the packed NaViT tower against the baselines, on one image-size distribution, in one run.

1. tower: images/s of packed NaViT (the training packer, `auto` attention) against two
   one-image-per-row baselines on exactly the same images (dense SDPA with a key-padding mask):
   padded to the longest image of its batch, and timm's NaFlex batching (each batch draws a
   sequence length from a fixed set, --naflex-seq-lens, holds tokens-per-batch / that length
   rows, and every image is resized to the most patches that fit it, aspect ratio kept,
   upscaled if smaller, as timm's NaFlexViT loader does); forward, and forward+backward.
2. attention: per-image SDPA (and flex/flash where a GPU runs) against SDPA with a dense
   block-diagonal mask, on the segments of the packed batch (L = --seq-len).
3. with a GPU only: flex packed against unmasked SDPA at the same L in bf16, and the model FLOPs
   utilisation of a NaViT-B/16 forward+backward.

Repetitions are interleaved (the variants take turns) and the median is reported, so drift of a
shared machine hits every variant alike.

    python tools/bench_tower.py /work/shared/data/image_sizes_laion_aesthetics.csv --preset Ti/16
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from navit_clip.batch import PackedBatch
from navit_clip.config import VisionConfig, vision_preset
from navit_clip.data.packing import PatchedImage, StreamingPacker, to_packed_batch
from navit_clip.data.resolution import ResolutionPolicy
from navit_clip.model.attention import get_attend
from navit_clip.model.navit import NaViT
from navit_clip.model.packed_sdpa import FunctionBackend
from size_csv import read_sizes



def draw_images(args: argparse.Namespace, patch: int) -> tuple[PackedBatch, list[PatchedImage], dict[str, tuple]]:
    """Images from the size distribution, through the training packer until one batch of
    --sequences sequences is complete; returns that batch, its images in stream order and
    each image's native (width, height)."""
    rng = np.random.default_rng(args.seed)
    sizes = read_sizes(args.csv)
    policy = ResolutionPolicy(patch_size=patch, max_tokens=args.max_tokens, max_side=args.max_side,
                              mode=args.resolution, min_tokens=args.min_tokens)
    packer = StreamingPacker(seq_len=args.seq_len, max_images=args.max_images, sequences_per_batch=args.sequences,
                             open_sequences=args.sequences)
    text = np.zeros(1, dtype=np.int64)
    stream: dict[str, PatchedImage] = {}
    for index in rng.permutation(len(sizes)):
        rows, cols = policy.grid_for(*sizes[index], rng=rng)
        coords = np.stack(np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij"), -1).reshape(-1, 2)
        image = PatchedImage(key=str(index), patches=rng.integers(0, 256, (rows * cols, patch * patch * 3), np.uint8),
                             coords=coords.astype(np.int64), grid=(rows, cols), text=text)
        stream[image.key] = image
        batches = packer.push(image)
        if batches:
            batch = batches[0]
            keys = {k for seq in batch.keys for k in seq}
            natives = {key: sizes[int(key)] for key in keys}
            return batch, [image for key, image in stream.items() if key in keys], natives
    raise SystemExit("the size file ran out before one packed batch was complete")


def padded_batches(images: list[PatchedImage], rows_per_batch: int, max_images: int) -> list[PackedBatch]:
    """timm-style: one image per row, each batch padded to its longest image."""
    out = []
    for start in range(0, len(images), rows_per_batch):
        chunk = images[start:start + rows_per_batch]
        longest = max(image.num_tokens for image in chunk)
        out.append(to_packed_batch([[image] for image in chunk], longest, max_images, chunk[0].patches.shape[1], 1))
    return out


def naflex_grid(width: int, height: int, patch: int, max_patches: int) -> tuple[int, int]:
    """timm NaFlex's size for a sequence length: the largest scale (up or down) whose grid,
    each side rounded up to whole patches, has at most max_patches patches."""
    def grid(scale: float) -> tuple[int, int]:
        return max(1, math.ceil(height * scale / patch)), max(1, math.ceil(width * scale / patch))

    low, high = 0.0, (max_patches + 1) * patch / min(width, height)
    for _ in range(60):
        mid = (low + high) / 2
        rows, cols = grid(mid)
        low, high = (mid, high) if rows * cols <= max_patches else (low, mid)
    return grid(low)


def naflex_batches(images: list[PatchedImage], natives: dict[str, tuple], patch: int, seq_lens: list[int],
                   tokens_per_batch: int, rng: np.random.Generator) -> list[PackedBatch]:
    """timm NaFlex batching: each batch draws a sequence length, holds tokens_per_batch // length
    rows (a multiple of 8 where that is possible), one image per row resized to fit the length."""
    out, start = [], 0
    while start < len(images):
        seq_len = int(seq_lens[int(rng.integers(len(seq_lens)))])
        rows_per_batch = tokens_per_batch // seq_len
        rows_per_batch = max(1, rows_per_batch - rows_per_batch % 8 if rows_per_batch >= 8 else rows_per_batch)
        rows = []
        for image in images[start:start + rows_per_batch]:
            r, c = naflex_grid(*natives[image.key], patch, seq_len)
            coords = np.stack(np.meshgrid(np.arange(r), np.arange(c), indexing="ij"), -1).reshape(-1, 2)
            rows.append([PatchedImage(key=image.key, patches=rng.integers(0, 256, (r * c, image.patches.shape[1]),
                                                                          np.uint8),
                                      coords=coords.astype(np.int64), grid=(r, c), text=image.text)])
        out.append(to_packed_batch(rows, seq_len, 1, images[0].patches.shape[1], 1))
        start += rows_per_batch
    return out


def timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def interleaved(variants: dict[str, Callable[[], object]], reps: int, warmup: int, device: torch.device,
                label: str) -> dict[str, float]:
    """Median seconds per variant; variants take turns in every repetition."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in tqdm(range(reps), desc=label, leave=False):
        for name, fn in variants.items():
            times[name].append(timed(fn, device))
    return {name: statistics.median(t) for name, t in times.items()}


def tower_step(model: NaViT, batches: list[PackedBatch], backward: bool) -> Callable[[], None]:
    def run() -> None:
        for batch in batches:
            with torch.set_grad_enabled(backward):
                out = model(batch.patches, batch.coords, batch.segment, batch.max_images, grid=batch.grid)
                if backward:
                    out.float().square().mean().backward()
        if backward:
            model.zero_grad(set_to_none=True)
    return run


def without_attention(model: NaViT) -> NaViT:
    """A copy of the tower whose attention returns the queries: its cost without attention."""
    bare = copy.deepcopy(model)
    bare.attend = FunctionBackend("skip", lambda q, k, v, segment: q)
    return bare


def describe(name: str, batches: list[PackedBatch], n: int) -> str:
    real = sum(int((b.segment >= 0).sum()) for b in batches)
    total = sum(b.seq_len * b.num_sequences for b in batches)
    lengths = sorted({b.seq_len for b in batches})
    return (f"  {name}: {len(batches)} batches, rows of {'/'.join(map(str, lengths))} tokens, {real / n:.1f} tokens "
            f"per image, {1 - real / total:.1%} padding")


def bench_tower(args, cfg: VisionConfig, batch: PackedBatch, images: list[PatchedImage], natives: dict[str, tuple],
                device, dtype) -> None:
    torch.manual_seed(0)
    packed_model = NaViT(cfg).to(device, dtype)
    padded_model = NaViT(VisionConfig(**{**cfg.__dict__, "attention": "sdpa"})).to(device, dtype)
    padded_model.load_state_dict(packed_model.state_dict())
    n = len(images)
    runs = {"packed": (packed_model, [batch]),
            "padded": (padded_model, padded_batches(images, args.padded_rows, 1)),
            "naflex": (padded_model, naflex_batches(images, natives, cfg.patch_size, args.naflex_seq_lens,
                                                    batch.num_sequences * batch.seq_len,
                                                    np.random.default_rng(args.seed)))}
    print(f"\n[tower] NaViT {args.preset} ({sum(p.numel() for p in packed_model.parameters()) / 1e6:.1f}M), "
          f"{n} images; padded: {args.padded_rows} rows a batch, each padded to its longest image; naflex: "
          f"sequence lengths {args.naflex_seq_lens}, {batch.num_sequences * batch.seq_len} tokens a batch")
    for name, (_, batches) in runs.items():
        print(describe(name, batches, n))
    if args.attention_split:  # the same towers with attention skipped: what the token-wise layers cost
        runs.update({f"{name} w/o attention": (without_attention(model), batches)
                     for name, (model, batches) in list(runs.items()) if name != "padded"})
    for backward in (False, True) if args.backward else (False,):
        variants = {name: tower_step(model, [b.to(device) for b in batches], backward)
                    for name, (model, batches) in runs.items()}
        secs = interleaved(variants, args.reps, 1, device, "tower")
        mode = "forward+backward" if backward else "forward"
        rates = "   ".join(f"{name} {n / secs[name]:7.1f} img/s" for name in ("packed", "padded", "naflex"))
        print(f"  {mode:17s} {rates}   packed/padded = {secs['padded'] / secs['packed']:.2f}x   "
              f"packed/naflex = {secs['naflex'] / secs['packed']:.2f}x")
        if args.attention_split:
            bare = {name: secs[f"{name} w/o attention"] for name in ("packed", "naflex")}
            print(f"  {'  w/o attention':17s} packed/naflex = {bare['naflex'] / bare['packed']:.2f}x;   attention alone: "
                  + "   ".join(f"{name} {secs[name] - bare[name]:.3f} s" for name in bare))


def bench_attention(args, cfg: VisionConfig, batch: PackedBatch, device, dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    S, L = batch.segment.shape
    H, Dh = cfg.heads, cfg.width // cfg.heads
    segment = batch.segment.to(device)
    names = ["sdpa", "sdpa_per_image"] + (["flex"] if device.type == "cuda" else [])
    print(f"\n[attention] S={S} L={L} H={H} Dh={Dh} {str(dtype).replace('torch.', '')}, "
          f"{int(batch.valid.sum())} images, Σn²/L² = {sum_sq(batch) / (S * L * L):.3f}")
    for backward in (False, True) if args.backward else (False,):
        leaves = [torch.randn(S, H, L, Dh, generator=gen).to(device, dtype).requires_grad_(backward) for _ in range(3)]

        def step(name: str) -> Callable[[], None]:
            bound = get_attend(name).bind(segment)  # per-batch work done once, as in a forward

            def run() -> None:
                with torch.set_grad_enabled(backward):
                    out = bound(*leaves)
                    if backward:
                        out.sum().backward()
            return run

        secs = interleaved({name: step(name) for name in names}, args.reps * 2, 2, device, "attention")
        mode = "forward+backward" if backward else "forward"
        parts = "   ".join(f"{name} {secs[name] * 1e3:7.1f} ms" for name in names)
        ratios = "   ".join(f"{name} {secs['sdpa'] / secs[name]:.2f}x" for name in names[1:])
        print(f"  {mode:17s} {parts}   speed-up over the dense mask: {ratios}")


def sum_sq(batch: PackedBatch) -> int:
    counts = [(batch.segment[s] == e).sum().item() for s in range(batch.num_sequences) for e in range(batch.max_images)]
    return int(sum(c * c for c in counts))


def bench_gpu(args, batch: PackedBatch, device) -> None:
    """FlexAttention packed vs unmasked SDPA at the same L (bf16), and MFU of NaViT-B/16 fwd+bwd."""
    dtype = torch.bfloat16
    S, L = batch.segment.shape
    H, Dh = 12, 64
    gen = torch.Generator().manual_seed(0)
    leaves = [torch.randn(S, H, L, Dh, generator=gen).to(device, dtype).requires_grad_() for _ in range(3)]
    flex = get_attend("flex").bind(batch.segment.to(device))

    def run(fn):
        def step():
            fn(*leaves).sum().backward()
        return step

    sdpa = torch.nn.functional.scaled_dot_product_attention
    secs = interleaved({"flex": run(flex), "sdpa": run(lambda q, k, v: sdpa(q, k, v))}, args.reps * 4, 3, device,
                       "flex")
    print(f"\n[gpu] bf16 fwd+bwd S={S} L={L} H={H} Dh={Dh}: flex packed {secs['flex'] * 1e3:.2f} ms, unmasked SDPA "
          f"{secs['sdpa'] * 1e3:.2f} ms, flex/unmasked speed = {secs['sdpa'] / secs['flex']:.2f}x")

    cfg = VisionConfig(**vision_preset("B/16"), max_grid_side=args.max_side)
    batch, _, _ = draw_images(args, cfg.patch_size)  # the same images, cut at patch 16
    torch.manual_seed(0)
    model = NaViT(cfg).to(device, dtype)
    step = tower_step(model, [batch.to(device)], backward=True)
    secs = interleaved({"b16": step}, args.reps * 2, 3, device, "mfu")["b16"]
    flops = model_flops(cfg, batch)
    print(f"[gpu] NaViT-B/16 fwd+bwd on {S}×{L} tokens: {secs * 1e3:.1f} ms, {flops / secs / 1e12:.1f} TFLOP/s, "
          f"MFU {flops / secs / (args.peak_tflops * 1e12):.1%} of {args.peak_tflops:.0f} TFLOP/s bf16 peak")


def model_flops(cfg: VisionConfig, batch: PackedBatch) -> float:
    """Forward+backward FLOPs of the useful work: 6·(matmul params)·(real tokens) plus the attention
    score and value products of each image with itself (12·D·Σn² per layer); padding is not counted."""
    D, depth = cfg.width, cfg.depth
    hidden = round(D * cfg.mlp_ratio)
    per_token = depth * (4 * D * D + 2 * D * hidden) + cfg.patch_size ** 2 * 3 * D
    tokens = int((batch.segment >= 0).sum())
    return 6.0 * per_token * tokens + depth * 12.0 * D * sum_sq(batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv")
    parser.add_argument("--preset", default="Ti/16", help="model.vision.preset of the tower to time")
    parser.add_argument("--depth", type=int, default=0, help="fewer blocks than the preset (0 = as the preset)")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--min-tokens", type=int, default=32)
    parser.add_argument("--resolution", choices=["native", "sampled"], default="sampled")
    parser.add_argument("--max-side", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--max-images", type=int, default=64)
    parser.add_argument("--sequences", type=int, default=4)
    parser.add_argument("--padded-rows", type=int, default=16, help="images per padded batch")
    parser.add_argument("--naflex-seq-lens", type=int, nargs="+", default=[32, 64, 144, 196, 256],
                        help="timm NaFlex's sequence lengths (timm: 128 256 576 784 1024; here scaled to the "
                             "256-token budget)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--backward", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--attention-split", action="store_true",
                        help="also time packed and naflex with attention skipped (where the difference lies)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak of the GPU (H100 SXM)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    overrides = {"depth": args.depth} if args.depth else {}
    cfg = VisionConfig(**{**vision_preset(args.preset), **overrides}, max_grid_side=args.max_side)
    batch, images, natives = draw_images(args, cfg.patch_size)
    print(f"{device} {str(dtype).replace('torch.', '')}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"sizes from {args.csv}, patch {cfg.patch_size}, {args.resolution} resolution "
          f"{args.min_tokens}..{args.max_tokens} tokens, L={args.seq_len}, E_max={args.max_images}")
    bench_tower(args, cfg, batch, images, natives, device, dtype)
    bench_attention(args, cfg, batch, device, dtype)
    if device.type == "cuda":
        bench_gpu(args, batch, device)
    else:
        print("\n[gpu] no CUDA device: flex vs unmasked SDPA and the MFU of NaViT-B/16 are not measured")


if __name__ == "__main__":
    main()
