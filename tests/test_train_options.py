"""Training options in single-process runs of the real CLI: gradient accumulation and bf16 on CPU,
each compared with a plain fp32 run on the same data stream."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from navit_clip.data.digits import make_digit_shards
from navit_clip.train.checkpoint import load_model_state
from navit_clip.train.metrics import read_jsonl
from navit_clip.train.schedule import warmup_cosine
from processes import TINY_TRAIN

pytestmark = pytest.mark.slow

TINY = [*TINY_TRAIN, "optim.warmup_steps=4"]


def train(shards: str, out: Path, *overrides: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "-m", "navit_clip", "train", *TINY, f"data.train_shards={shards}",
                           f"train.out_dir={out}", *overrides], capture_output=True, text=True, timeout=400,
                          env={**env, "MKL_CBWR": "COMPATIBLE"})
    assert proc.returncode == 0, f"train failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return read_jsonl(out / "metrics.jsonl")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("options")
    info = make_digit_shards(root / "digits", train_copies=1, eval_per_class=2, max_train_digits=200,
                             shards_train=4, shards_eval=1)
    info["root"] = root
    info["fp32"] = train(info["train_shards"], root / "fp32", "train.steps=4")
    return info


def test_gradient_accumulation_steps_once_per_accumulated_batch(data):
    rows = train(data["train_shards"], data["root"] / "accum", "train.steps=2", "train.grad_accum_steps=2")
    plain = data["fp32"]
    # each optimizer step consumed two consecutive batches of the same stream
    assert [r["images_per_step"] for r in rows] == [plain[0]["images_per_step"] + plain[1]["images_per_step"],
                                                     plain[2]["images_per_step"] + plain[3]["images_per_step"]]
    _, client = load_model_state(data["root"] / "accum" / "checkpoints")
    assert client["step"] == 2 and client["data"]["batches"] == 4
    # the schedule advanced once per optimizer step, not per micro-batch (warmup of 4 steps)
    assert [r["lr"] for r in rows] == pytest.approx([1e-3 * warmup_cosine(k, total_steps=2, warmup_steps=4)
                                                     for k in (1, 2)])
    assert rows[0]["loss"] != plain[0]["loss"]  # the loss is the mean over two micro-batches
    # the training FLOPs of two micro-batches per step: those of two plain steps
    assert [r["flops"] for r in rows] == pytest.approx([plain[1]["flops"], plain[3]["flops"]], rel=1e-12)


def test_bf16_on_cpu_trains_resumes_and_saves_fp32_weights(data):
    out = data["root"] / "bf16"
    train(data["train_shards"], out, "train.steps=2", "train.ckpt_every=2", "train.precision=bf16")
    rows = train(data["train_shards"], out, "train.steps=4", "train.ckpt_every=2", "train.precision=bf16",
                 "train.extend=true")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    plain = data["fp32"]
    # same initial weights and batch, computed in bf16: close to the fp32 loss but not equal to it
    assert rows[0]["loss"] == pytest.approx(plain[0]["loss"], abs=0.05)
    assert rows[0]["loss"] != plain[0]["loss"]
    assert all(r["loss"] is not None and r["loss"] < 10 for r in rows)
    # cumulative FLOPs depend on the batches only, and carry over the resume at step 2
    flops = [r["flops"] for r in rows]
    assert flops == [r["flops"] for r in plain] and all(b > a for a, b in zip([0.0, *flops], flops))
    weights, client = load_model_state(out / "checkpoints")
    assert client["step"] == 4
    assert all(t.dtype == torch.float32 for t in weights.values())
