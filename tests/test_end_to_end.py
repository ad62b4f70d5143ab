"""The whole slice through the real CLI, in subprocesses: shards -> train under DeepSpeed ->
checkpoint -> resume (also after a hard kill) -> zero-shot eval -> export -> standalone loader."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from navit_clip.data.digits import make_digit_shards
from navit_clip.data.loader import PackedStream
from navit_clip.data.spec import evaluation_spec
from navit_clip.train.checkpoint import latest_tag, load_model_state, load_trained_model
from navit_clip.train.metrics import read_jsonl

pytestmark = pytest.mark.slow

# Small but not too small: narrower towers or fewer images per step sit on the uniform-logit
# plateau (loss = ln(batch)) for well over 100 steps, which would make "it learns" untestable here.
# So does the default's temperature of 1/0.07 without clipping at this size and step count (it
# pays over the default's 1,000 steps): these runs keep a temperature of 1/10 and clip at 1. They
# keep every patch a token too: ~130 images a step leave the plateau later than 60 steps.
TINY = [
    "model.vision.depth=2", "model.text.depth=2", "data.seq_len=256", "data.max_images=16",
    "data.sequences_per_batch=8", "data.resolution.max_tokens=64", "data.resolution.skip_blank_below=0",
    "data.num_workers=1",
    "optim.warmup_steps=5", "optim.lr=1e-3", "train.log_every=4",
    "model.init_logit_scale=2.302585", "optim.grad_clip=1.0",
]


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> dict:
    return make_digit_shards(tmp_path_factory.mktemp("digits"), train_copies=1, eval_per_class=10,
                             max_train_digits=600, shards_train=4, shards_eval=1)


def clean_env() -> dict[str, str]:
    """This environment without launcher variables. MKL_CBWR: MKL's reproducible mode, so that two
    identical runs agree to ~1e-7 (without it, results depend on memory alignment and drift apart
    by ~1e-4 within a dozen steps)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "PYTHONUNBUFFERED": "1", "MKL_CBWR": "COMPATIBLE"}


# Bit-identical CPU runs also need one thread: with several, the order of some reductions in the
# backward pass follows thread scheduling, and parameters of two identical runs differ by ~1e-12.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def start(*args: str, env: dict | None = None, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "navit_clip", *args], env={**clean_env(), **(env or {})}, text=True,
                            **popen)


def cli(*args: str, timeout: int = 900, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "navit_clip", *args], capture_output=True, text=True,
                          timeout=timeout, env={**clean_env(), **(env or {})})
    assert proc.returncode == 0, f"navit-clip {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def train_args(digits: dict, out: Path, steps: int, ckpt_every: int) -> list[str]:
    return ["train", *TINY, f"data.train_shards={digits['train_shards']}", f"data.eval_shards={digits['eval_shards']}",
            f"train.out_dir={out}", f"train.steps={steps}", f"train.ckpt_every={ckpt_every}"]


def test_train_resume_eval_export(digits, tmp_path):
    run = tmp_path / "run"
    cli(*train_args(digits, run, steps=60, ckpt_every=30))
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(4, 64, 4))
    # Below chance: a contrastive loss under ln(images in the batch) means pairs are being told apart,
    # which a collapsed model (uniform logits) cannot do.
    margins = [r["loss"] - math.log(r["images_per_step"]) for r in rows]
    assert sum(margins[-4:]) / 4 < -0.05, f"loss - ln(batch) per logged step: {margins}"
    assert latest_tag(run / "checkpoints") == "step60"

    # Resume: a longer run continues from step 60, and its steps continue the same metrics file.
    cli(*train_args(digits, run, steps=68, ckpt_every=30), "train.extend=true")
    steps = [r["step"] for r in read_jsonl(run / "metrics.jsonl")]
    assert steps == list(range(4, 72, 4))
    assert latest_tag(run / "checkpoints") == "step68"
    # keep_checkpoints=2: only the two newest remain
    assert sorted(p.name for p in (run / "checkpoints").glob("step*")) == ["step60", "step68"]

    # refusals that name the problem: reusing a run dir without resume, resuming a different stream
    for extra, message in ((["train.resume=false"], "train.resume=true"), (["--resume", "never"], "train.resume=true"),
                           (["data.max_images=12"], "max_images")):
        bad = subprocess.run([sys.executable, "-m", "navit_clip", *train_args(digits, run, steps=68, ckpt_every=30),
                              *extra], capture_output=True, text=True, env=clean_env(), timeout=900)
        assert bad.returncode == 2 and message in bad.stderr, bad.stderr[-2000:]
    assert latest_tag(run / "checkpoints") == "step68"

    proc = cli("eval", "--run", str(run))
    record = json.loads((run / "eval" / "zeroshot.json").read_text())  # CLIP_benchmark's format
    result, details = record["metrics"], record["details"]
    assert record["task"] == "zeroshot_classification" and record["language"] == "en"
    assert details["num_images"] == 100 and details["num_classes"] == 10 and details["step"] == 68
    assert 0.0 <= result["acc1"] <= result["acc5"] <= 1.0
    assert "acc1" in proc.stdout
    # any token budget: evaluate the same checkpoint with half the tokens per image
    cli("eval", "--run", str(run), "--out", str(tmp_path / "small.json"), "eval.max_tokens_per_image=24")
    assert json.loads((tmp_path / "small.json").read_text())["details"]["max_tokens_per_image"] == 24

    cli("export", "--run", str(run), "--out", str(tmp_path / "encoder"))
    from navit_clip.export import load_image_encoder

    encoder = load_image_encoder(tmp_path / "encoder")
    model, cfg, _ = load_trained_model(run)
    spec = evaluation_spec(cfg, digits["eval_shards"])
    batch = next(iter(PackedStream(spec)))
    with torch.no_grad():
        expected = model.encode_image_slots(batch)[batch.valid.flatten()]
        got = encoder(batch)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_hard_kill_resumes_exactly(digits, tmp_path):
    """SIGKILL mid-run (no chance to save), resume from the last complete checkpoint: every step's
    loss, batch and parameters are bit-identical to an uninterrupted run's. Model, optimizer, LR
    schedule, data position and random generators all come back."""
    steps, exact = 24, ["train.log_every=1"]
    straight, run = tmp_path / "straight", tmp_path / "run"
    proc = start(*train_args(digits, run, steps=steps, ckpt_every=3), *exact, env=ONE_THREAD,
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    try:
        while time.time() < deadline and latest_tag(run / "checkpoints") in (None, "step3"):
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_at = latest_tag(run / "checkpoints")
    assert killed_at is not None and killed_at != "step3", "training made no progress before the kill"
    killed_step = int(killed_at[4:])
    assert killed_step < steps, "the run finished before it was killed; raise `steps`"
    _, client = load_model_state(run / "checkpoints")
    assert client["data"]["batches"] == killed_step  # the data position: one batch per step
    # a half-written checkpoint newer than `latest` must be ignored
    (run / "checkpoints" / "step999").mkdir()
    out = cli(*train_args(digits, run, steps=steps, ckpt_every=3), *exact, env=ONE_THREAD)
    summary = json.loads(out.stdout[out.stdout.index("{"):])
    assert summary["resumed_from"] == killed_step
    assert latest_tag(run / "checkpoints") == f"step{steps}"

    cli(*train_args(digits, straight, steps=steps, ckpt_every=100), *exact, env=ONE_THREAD)
    a, b = read_jsonl(straight / "metrics.jsonl"), read_jsonl(run / "metrics.jsonl")
    # steps the killed run logged after its last checkpoint were dropped when it resumed
    assert [r["step"] for r in b] == [r["step"] for r in a] == list(range(1, steps + 1))
    for x, y in zip(a, b):
        for key in ("loss", "lr", "logit_scale", "images_per_step", "padding", "param_checksums"):
            assert x[key] == y[key], f"step {x['step']} {key}: uninterrupted {x[key]} vs killed+resumed {y[key]}"


def test_sigterm_saves_the_current_step_and_exits_cleanly(digits, tmp_path):
    run = tmp_path / "run"
    proc = start(*train_args(digits, run, steps=400, ckpt_every=1000), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                 start_new_session=True)
    deadline = time.time() + 600
    metrics = run / "metrics.jsonl"
    while time.time() < deadline and not (metrics.exists() and len(read_jsonl(metrics)) >= 2):
        time.sleep(0.3)
    # to the whole process group, as Slurm and the deepspeed launcher do: the DataLoader worker
    # gets it too and must not die before the trainer has saved
    os.killpg(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0
    summary = json.loads(out[out.index("{"):])
    assert summary["stopped_early"] and 4 <= summary["steps"] < 400
    assert latest_tag(run / "checkpoints") == f"step{summary['steps']}"  # not a multiple of ckpt_every
    # and the next run continues from there
    again = cli(*train_args(digits, run, steps=summary["steps"] + 2, ckpt_every=1000), "train.extend=true")
    assert json.loads(again.stdout[again.stdout.index("{"):])["resumed_from"] == summary["steps"]
