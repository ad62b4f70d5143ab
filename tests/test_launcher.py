"""Two ranks started by the deepspeed launcher (gloo on CPU): training, checkpoint, resume."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from navit_clip.data.digits import make_digit_shards
from navit_clip.train.checkpoint import latest_tag, load_trained_model
from navit_clip.train.metrics import read_jsonl
from processes import TINY_TRAIN, free_port

pytestmark = pytest.mark.slow

TINY = [*TINY_TRAIN, "optim.warmup_steps=2"]


def launch(out: Path, shards: str, steps: int, deepspeed_json: Path) -> subprocess.CompletedProcess:
    deepspeed = Path(sys.executable).parent / "deepspeed"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    port = free_port()
    cmd = [str(deepspeed), "--num_gpus", "2", "--master_port", str(port), "--module", "navit_clip.cli", "train",
           *TINY, f"data.train_shards={shards}", f"train.out_dir={out}", f"train.steps={steps}", "train.ckpt_every=3",
           f"train.deepspeed={deepspeed_json}", "train.extend=true"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env)
    assert proc.returncode == 0, f"deepspeed launcher failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    # DeepSpeed's CPU all-reduce buffers (66 MB of /dev/shm per rank) are not left behind
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    return proc


def test_launch_scripts_parse():
    scripts = sorted(Path(__file__).resolve().parents[1].glob("launch/*.sh"))
    scripts += sorted(Path(__file__).resolve().parents[1].glob("launch/*.sbatch"))
    assert len(scripts) >= 4
    for script in scripts:
        subprocess.run(["bash", "-n", str(script)], check=True)


def test_two_ranks_zero1_train_checkpoint_and_resume(tmp_path):
    """ZeRO stage 1 partitions the optimizer state: each rank writes and must read back its own
    shard, through the weights_only loader."""
    info = make_digit_shards(tmp_path / "digits", train_copies=1, eval_per_class=2, max_train_digits=200,
                             shards_train=4, shards_eval=1)
    zero1 = tmp_path / "zero1.json"
    zero1.write_text('{"zero_optimization": {"stage": 1}}')
    run = tmp_path / "run"
    launch(run, info["train_shards"], steps=3, deepspeed_json=zero1)
    assert len(list((run / "checkpoints" / "step3").glob("zero_pp_rank_*_optim_states.pt"))) == 2
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["world_size"] == 2 for r in rows)
    assert latest_tag(run / "checkpoints") == "step3"

    launch(run, info["train_shards"], steps=5, deepspeed_json=zero1)
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]  # resumed at 3: nothing repeated, nothing lost
    model, cfg, step = load_trained_model(run)
    assert step == 5 and cfg.model.vision.width == 32
