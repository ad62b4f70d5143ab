"""Peak memory and time of navit-clip's chunked contrastive loss against open_clip's ClipLoss, in
the same run, on W real gloo processes (CPU) or W GPUs (nccl, --device cuda), at growing global
batch.

    python tools/bench_loss.py --world 2,4 --batch 4096,16384,65536 --dim 64
    python tools/bench_loss.py --device cuda --world 1 --batch 32768 --dim 512 --baseline-max 32768

Both losses run forward + backward on the same random embeddings, interleaved, `--repeats` times;
the table shows the medians and the ratios ours / open_clip. Memory is the growth of the process's
resident set during the call (peak RSS, reset before each call through /proc/self/clear_refs, with
malloc told to return large blocks to the system at once), the largest over ranks; on a GPU it is
the growth of torch's peak allocated device memory during the call. Time is the
slowest rank's wall time. open_clip is skipped above --baseline-max because its [b, B] logits
(several copies of them) would not fit; ours keeps going.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def _rss_kib() -> tuple[int, int]:
    status = Path("/proc/self/status").read_text()
    return tuple(int(re.search(rf"{key}:\s+(\d+)", status).group(1)) for key in ("VmRSS", "VmHWM"))  # type: ignore


def _measure(fn, device: torch.device) -> tuple[float, float, torch.Tensor]:
    """(peak growth of memory in MiB, seconds, loss) of one forward + backward: resident memory
    on CPU, allocated device memory on a GPU."""
    from navit_clip import dist

    dist.barrier()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device) / 1024
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS high-water mark
        before, _ = _rss_kib()
    start = time.perf_counter()
    loss = fn()
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 1024 if cuda else _rss_kib()[1]
    stats = torch.tensor([(peak - before) / 1024, seconds], dtype=torch.float64, device=device)
    stats = dist.all_gather_no_grad(stats).cpu()
    stats = stats.reshape(-1, 2).max(dim=0).values
    return float(stats[0]), float(stats[1]), loss


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    import torch.distributed as tdist
    from open_clip.loss import ClipLoss

    from navit_clip.loss import contrastive_loss

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device(args.device, rank) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    tdist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    rows = []
    for batch in args.batch:
        n = batch // world
        g = torch.Generator().manual_seed(rank)
        image = F.normalize(torch.randn(n, args.dim, generator=g), dim=-1)
        text = F.normalize(torch.randn(n, args.dim, generator=g) + image, dim=-1)
        image, text = image.to(device), text.to(device)
        valid = torch.ones(n, dtype=torch.bool, device=device)

        def ours() -> torch.Tensor:
            i, t = image.clone().requires_grad_(), text.clone().requires_grad_()
            scale = torch.tensor(20.0, device=device, requires_grad=True)
            loss = contrastive_loss(i, t, valid, scale, chunk_size=args.chunk)
            loss.backward()
            return loss.detach()

        def theirs() -> torch.Tensor:
            i, t = image.clone().requires_grad_(), text.clone().requires_grad_()
            scale = torch.tensor(20.0, device=device, requires_grad=True)
            loss = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)(i, t, scale)
            loss.backward()
            from navit_clip import dist
            return dist.all_reduce_sum(loss.detach().reshape(1)).reshape(()) / world

        run_baseline = batch <= args.baseline_max
        samples: dict[str, list] = {"ours": [], "open_clip": []}
        for _ in range(args.repeats):
            samples["ours"].append(_measure(ours, device))
            if run_baseline:
                samples["open_clip"].append(_measure(theirs, device))
        row = {"world": world, "batch": batch}
        for name, runs in samples.items():
            if runs:
                row[name] = (statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs))
        if run_baseline:
            row["loss_diff"] = abs(float(samples["ours"][-1][2]) - float(samples["open_clip"][-1][2]))
        rows.append(row)
    if rank == 0:
        torch.save(rows, Path(out) / "rows.pt")
    tdist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=_ints, default=[2, 4], help="world sizes, comma-separated")
    parser.add_argument("--batch", type=_ints, default=[4096, 16384, 65536], help="global batch sizes")
    parser.add_argument("--dim", type=int, default=64, help="embedding width D")
    parser.add_argument("--chunk", type=int, default=1024, help="chunk_size of our loss")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline-max", type=int, default=16384,
                        help="largest global batch at which open_clip's ClipLoss is run")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: one GPU per rank, nccl")
    parser.add_argument("--json", default=None, help="also write the rows (per world size) to this JSON file")
    args = parser.parse_args(argv)
    # large blocks straight from and back to the OS, so resident memory follows live tensors
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    import torch.multiprocessing as mp

    where = "GPU nccl" if args.device == "cuda" else "CPU gloo"
    print(f"chunked contrastive loss vs open_clip ClipLoss(local_loss, gather_with_grad), forward+backward, "
          f"D={args.dim}, chunk={args.chunk}, fp32, {where}, median of {args.repeats}")
    print(f"{'W':>2} {'batch':>7} | {'ours MiB':>9} {'open_clip MiB':>13} {'mem ratio':>9} | "
          f"{'ours s':>7} {'open_clip s':>11} {'time ratio':>10} | {'|Δloss|':>8}")
    every_row = []
    for world in args.world:
        with tempfile.TemporaryDirectory() as out:
            mp.spawn(_worker, args=(world, _free_port(), args, out), nprocs=world, join=True)
            rows = torch.load(Path(out) / "rows.pt", weights_only=False)
        every_row += rows
        for row in rows:
            mem, sec = row["ours"]
            line = f"{world:>2} {row['batch']:>7} | {mem:>9.1f} "
            if "open_clip" in row:
                base_mem, base_sec = row["open_clip"]
                line += (f"{base_mem:>13.1f} {mem / base_mem:>9.3f} | {sec:>7.3f} {base_sec:>11.3f} "
                         f"{sec / base_sec:>10.2f} | {row['loss_diff']:>8.1e}")
            else:
                line += f"{'skipped':>13} {'':>9} | {sec:>7.3f} {'skipped':>11} {'':>10} |"
            print(line, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(every_row, indent=1))


if __name__ == "__main__":
    sys.exit(main())
