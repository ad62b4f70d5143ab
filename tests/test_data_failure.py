"""A data failure on one rank stops every rank with the same error naming that rank: through
`agreed` in two gloo processes, and end to end through the deepspeed launcher."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from navit_clip.data.digits import make_digit_shards
from navit_clip.data.shards import NoUsableSampleError, ShardError
from navit_clip.errors import RankDataError
from navit_clip.train.data_failure import agreed
from processes import TINY_TRAIN, free_port, spawn_and_wait

WORLD = 2


def test_single_process_keeps_the_original_error():
    assert agreed(lambda: 7) == 7
    worker_text = ("Caught NoUsableSampleError in DataLoader worker process 0.\nTraceback ...\n"
                   "navit_clip.data.shards.NoUsableSampleError: no usable sample in shard a.tar")

    def fail():
        raise NoUsableSampleError(worker_text)

    with pytest.raises(NoUsableSampleError, match=r"^no usable sample in shard a\.tar$"):
        agreed(fail)


def _worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as tdist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    tdist.init_process_group("gloo", rank=rank, world_size=WORLD)
    results: dict = {"discarded": []}

    def fetch(failing: set[int], error: Exception):
        def run():
            if rank in failing:
                raise error
            return f"batch of rank {rank}"
        return run

    try:
        results["ok"] = agreed(fetch(set(), ShardError("unused")))
        for name, failing, error in [("one", {1}, ShardError("shard b.tar (not a tar archive)")),
                                     ("both", {0, 1}, ShardError(f"shard r{rank}.tar does not exist")),
                                     ("bug", {1}, KeyError("boom"))]:
            try:
                agreed(fetch(failing, error), discard=results["discarded"].append)
            except RankDataError as exc:
                results[name] = str(exc)
        tdist.barrier()
    finally:
        torch.save(results, Path(out) / f"rank{rank}.pt")
        tdist.destroy_process_group()


def test_every_rank_raises_the_first_failing_ranks_error(tmp_path):
    spawn_and_wait(_worker, (free_port(), str(tmp_path)), WORLD, 120, "ranks agreeing on a data failure")
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    assert [r["ok"] for r in results] == ["batch of rank 0", "batch of rank 1"]
    for r in results:
        assert r["one"] == "rank 1: shard b.tar (not a tar archive)"
        assert r["both"] == "rank 0: shard r0.tar does not exist"  # the first failing rank's error
        assert r["bug"] == "rank 1: KeyError: 'boom'"
    # only a rank whose own fetch succeeded releases what it fetched
    assert results[0]["discarded"] == ["batch of rank 0", "batch of rank 0"]
    assert results[1]["discarded"] == []


@pytest.mark.slow
def test_launcher_one_ranks_shards_all_corrupt_stops_both_ranks(tmp_path):
    """Rank 1 reads shards 1 and 3 of 4 (one DataLoader worker per rank); both are garbage.
    Both ranks exit non-zero within 60 s, each printing the error that names rank 1 and a shard."""
    info = make_digit_shards(tmp_path / "digits", train_copies=1, eval_per_class=2, max_train_digits=200,
                             shards_train=4, shards_eval=1)
    shards = sorted((tmp_path / "digits").glob("train-*.tar"))
    assert len(shards) == 4
    for shard in shards[1::2]:
        shard.write_bytes(os.urandom(4096))
    logs = tmp_path / "logs"
    deepspeed = Path(sys.executable).parent / "deepspeed"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    cmd = [str(deepspeed), "--num_gpus", "2", "--master_port", str(free_port()), "--enable_each_rank_log", str(logs),
           "--module", "navit_clip.cli", "train", *TINY_TRAIN, "optim.warmup_steps=1",
           f"data.train_shards={info['train_shards']}", f"train.out_dir={tmp_path / 'run'}", "train.steps=50"]
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0, proc.stdout[-3000:]
    rank_logs = sorted(logs.glob("*.log"))
    assert len(rank_logs) == 2, [p.name for p in logs.iterdir()]
    named = re.compile(r"navit-clip train: error: rank 1: no usable sample in shards .*train-00000[13]\.tar")
    for log in rank_logs:
        assert len(named.findall(log.read_text())) == 1, f"{log.name}:\n{log.read_text()[-3000:]}"
    assert elapsed < 60, f"the ranks took {elapsed:.0f} s to stop"

