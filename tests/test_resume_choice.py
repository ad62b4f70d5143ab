"""Changing train.steps on resume (refused unless train.extend, then a schedule without a jump)
and `--resume stepN` (a named, complete checkpoint), from the schedule up to the real CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from navit_clip.config import ConfigError, config_to_dict, load_config
from navit_clip.errors import CheckpointError
from navit_clip.train.checkpoint import latest_tag, write_latest
from navit_clip.train.manifest import write_manifest
from navit_clip.train.metrics import read_jsonl
from navit_clip.train.resume import choose_resume_step
from navit_clip.train.schedule import WarmupCosine, continue_schedule
from processes import TINY_TRAIN


def cosine(base: float, min_ratio: float, progress: float) -> float:
    """The reference decay: half a cosine from 1 down to min_ratio as progress goes 0 -> 1."""
    return min_ratio + (1 - min_ratio) * (1 + math.cos(math.pi * progress)) / 2


def test_a_fresh_schedule_is_warmup_then_cosine():
    schedule = WarmupCosine(20, 4, 0.1)
    assert [schedule(k) for k in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert [schedule(k) for k in range(4, 21)] == pytest.approx([cosine(1, 0.1, (k - 4) / 16) for k in range(4, 21)])


@pytest.mark.parametrize("resume_at, new_total", [(12, 40), (12, 16), (2, 40)])
def test_a_continued_schedule_has_no_jump_and_ends_at_the_floor(resume_at, new_total):
    schedule = WarmupCosine(20, 4, 0.1)
    before = [schedule(k) for k in range(resume_at + 1)]
    schedule.continue_to(resume_at, new_total)
    after = [schedule(k) for k in range(resume_at, new_total + 1)]
    assert after[0] == before[-1]  # the multiplier at the resume step is the one it had
    assert after[-1] == pytest.approx(0.1) and schedule(new_total + 5) == pytest.approx(0.1)
    decaying = after[max(0, 4 - resume_at):]  # from the end of warmup on
    assert all(a >= b for a, b in zip(decaying, decaying[1:]))
    if new_total > 20:  # a longer run: no step drops faster than the steepest of the original schedule
        fresh = [WarmupCosine(20, 4, 0.1)(k) for k in range(4, 21)]
        assert max(a - b for a, b in zip(decaying, decaying[1:])) <= max(a - b for a, b in zip(fresh, fresh[1:]))


def test_the_continued_horizon_travels_in_the_scheduler_state():
    """DeepSpeed checkpoints LambdaLR's state_dict: it carries the schedule's attributes, so a
    checkpoint written after an extension continues the extended schedule."""
    def scheduler():
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        return torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(20, 4, 0.0))

    extended = scheduler()
    for _ in range(12):
        extended.optimizer.step()
        extended.step()
    continue_schedule(extended, 12, 40)
    restored = scheduler()
    restored.load_state_dict(extended.state_dict())
    assert [restored.lr_lambdas[0](k) for k in range(12, 41)] == [extended.lr_lambdas[0](k) for k in range(12, 41)]
    continue_schedule(restored, 12, 40)  # the same horizon again: nothing changes
    assert restored.lr_lambdas[0].__dict__ == extended.lr_lambdas[0].__dict__


def test_a_checkpoint_without_a_saved_schedule_continues_from_its_configured_horizon():
    """Before the schedule was a callable object, LambdaLR saved none of it: the checkpoint's
    config then says which train.steps it was trained toward."""
    from functools import partial

    from navit_clip.train.schedule import restore_horizon, warmup_cosine

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    old = torch.optim.lr_scheduler.LambdaLR(opt, partial(warmup_cosine, total_steps=20, warmup_steps=4))
    for _ in range(12):
        opt.step()
        old.step()
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    resumed = torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(40, 4, 0.0))  # built with the new train.steps
    resumed.load_state_dict(old.state_dict())
    restore_horizon(resumed, {"train": {"steps": 20}})
    continue_schedule(resumed, 12, 40)
    reference = WarmupCosine(20, 4, 0.0)
    reference.continue_to(12, 40)
    assert [resumed.lr_lambdas[0](k) for k in range(12, 41)] == [reference(k) for k in range(12, 41)]
    assert resumed.lr_lambdas[0](12) == warmup_cosine(12, total_steps=20, warmup_steps=4)


def fake_run(out: Path, steps: list[int], *overrides: str, damaged: int | None = None) -> Path:
    """A run directory whose checkpoints hold their config.json and a manifest (no weights)."""
    ckpt = out / "checkpoints"
    for step in steps:
        tag_dir = ckpt / f"step{step}"
        tag_dir.mkdir(parents=True)
        (tag_dir / "config.json").write_text(json.dumps(config_to_dict(load_config(None, [*TINY_TRAIN, *overrides]))))
        (tag_dir / "rng_rank0.pt").write_bytes(os.urandom(100))
        write_manifest(tag_dir, 0, 1, step, ["config.json", "rng_rank0.pt"])
        if step == damaged:
            (tag_dir / "rng_rank0.pt").write_bytes(os.urandom(50))
    write_latest(ckpt, f"step{steps[-1]}")
    return ckpt


def cfg(out: Path, *overrides: str):
    return load_config(None, [*TINY_TRAIN, f"train.out_dir={out}", *overrides])


def test_a_different_train_steps_is_refused_unless_extended(tmp_path):
    ckpt = fake_run(tmp_path, [4], "train.steps=10", "optim.lr=0.001")
    with pytest.raises(ConfigError) as exc:
        choose_resume_step(cfg(tmp_path, "train.steps=20"), ckpt)
    message = str(exc.value)
    assert "train.steps=20" in message and "train.steps=10" in message and "train.extend=true" in message
    assert "\n" not in message
    assert choose_resume_step(cfg(tmp_path, "train.steps=20", "train.extend=true"), ckpt) == 4
    assert choose_resume_step(cfg(tmp_path, "train.steps=6", "train.extend=true"), ckpt) == 4  # shorter, past 4
    assert choose_resume_step(cfg(tmp_path, "train.steps=10"), ckpt) == 4
    for steps in (4, 3):  # not past the checkpoint: nothing left to decay over
        with pytest.raises(ConfigError, match=f"train.steps={steps} is not past step 4"):
            choose_resume_step(cfg(tmp_path, f"train.steps={steps}", "train.extend=true"), ckpt)
    # the rest of the schedule is the checkpoint's optimizer and scheduler state: a change is named
    with pytest.raises(ConfigError, match=r"optim.lr: 0.001 -> 0.002.*optim.warmup_steps"):
        choose_resume_step(cfg(tmp_path, "train.steps=10", "optim.lr=0.002", "optim.warmup_steps=7"), ckpt)


def test_resume_names_a_checkpoint_that_must_be_complete(tmp_path):
    ckpt = fake_run(tmp_path, [2, 4, 6, 8], damaged=6)
    assert choose_resume_step(cfg(tmp_path), ckpt, "step4") == 4
    assert choose_resume_step(cfg(tmp_path), ckpt, "step8") == 8
    for tag, problem in (("step6", "rng_rank0.pt has 50 bytes"), ("step5", "step5 does not exist"),
                         ("nevr", "--resume takes latest, never or a checkpoint name stepN")):
        with pytest.raises(CheckpointError) as exc:
            choose_resume_step(cfg(tmp_path), ckpt, tag)
        assert problem in str(exc.value) and str(exc.value).endswith(f"complete checkpoints in {ckpt}: step2, step4, step8")
    assert latest_tag(ckpt) == "step8"  # choosing touches nothing


def train(out: Path, shards: str, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "-m", "navit_clip", "train", *TINY_TRAIN, "optim.warmup_steps=2",
                           "train.keep_checkpoints=3", f"data.train_shards={shards}", f"train.out_dir={out}", *args],
                          capture_output=True, text=True, timeout=400, env={**env, "MKL_CBWR": "COMPATIBLE"})
    assert (proc.returncode == 0) == ok, f"train {args}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


def lrs(out: Path) -> dict[int, float]:
    return {r["step"]: r["lr"] for r in read_jsonl(out / "metrics.jsonl")}


@pytest.mark.slow
def test_cli_extends_a_run_from_a_named_checkpoint(tmp_path):
    from navit_clip.data.digits import make_digit_shards

    shards = make_digit_shards(tmp_path / "digits", train_copies=1, eval_per_class=2, max_train_digits=60,
                               shards_train=2, shards_eval=1)["train_shards"]
    run, ckpt = tmp_path / "run", tmp_path / "run" / "checkpoints"
    train(run, shards, "train.steps=6", "train.ckpt_every=2")
    first = lrs(run)

    refused = train(run, shards, "--resume", "step4", "train.steps=10", ok=False)
    error = refused.stderr.strip().splitlines()[-1]
    assert refused.returncode == 2 and "train.steps=10" in error and "train.steps=6" in error
    assert "train.extend=true" in error
    missing = train(run, shards, "--resume", "step5", "train.steps=6", ok=False).stderr.strip().splitlines()[-1]
    assert missing.endswith(f"complete checkpoints in {ckpt}: step2, step4, step6")

    out = train(run, shards, "--resume", "step4", "train.steps=10", "train.extend=true", "train.ckpt_every=3").stdout
    assert json.loads(out[out.index("{"):])["resumed_from"] == 4
    extended = lrs(run)
    assert sorted(extended) == list(range(1, 11))  # the rows of steps 5 and 6 of the first run were dropped
    assert [extended[k] for k in range(1, 5)] == [first[k] for k in range(1, 5)]
    # the LR decays on from where it was at step 4 (the row of step k holds the LR of the step
    # after it), no faster than before, to 0 at the new end
    assert extended[4] == first[4] == pytest.approx(1e-3 * cosine(1, 0, 2 / 4))
    steps = [extended[k] for k in range(4, 11)]
    assert all(0 < a - b <= first[3] - first[4] for a, b in zip(steps, steps[1:])) and steps[-1] == 0.0
    assert latest_tag(ckpt) == "step10"

    # a later resume (same train.steps) continues the extended schedule the checkpoint carries;
    # the newer checkpoints stay until this run's own saves replace them
    kept = (ckpt / "step9" / "model.safetensors").read_bytes()
    train(run, shards, "--resume", "step6", "train.steps=10", "train.ckpt_every=100")
    again = lrs(run)
    assert [again[k] for k in range(7, 11)] == [extended[k] for k in range(7, 11)]
    assert (ckpt / "step9" / "model.safetensors").read_bytes() == kept and latest_tag(ckpt) == "step10"
