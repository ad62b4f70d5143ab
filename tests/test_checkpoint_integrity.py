"""Checkpoints that can be trusted: every rank records its files' sizes and checksums, resume
verifies them and falls back to the previous complete checkpoint, every rank takes rank 0's
decision, a changed model or a damaged `latest` is one line, a full disk leaves `latest` alone,
and model.safetensors gets the permissions of the other files."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import types
from pathlib import Path

import pytest
import torch

from navit_clip.config import ConfigError, config_to_dict, load_config
from navit_clip.errors import CheckpointError, DiskFullError, InputError, UserError
from navit_clip.train.checkpoint import latest_tag, new_file_mode, save_model_file, save_rng_state, step_tag, write_latest
from navit_clip.train.manifest import checkpoint_problem, file_digest, manifest_name, write_manifest
from navit_clip.train.resume import find_resume_step
from navit_clip.train.save import disk_full_message, ensure_free_space, is_disk_full

from processes import free_port, spawn_and_wait

TINY_MODEL = ["model.vision.width=32", "model.vision.depth=1", "model.vision.heads=2"]


def fake_checkpoint(ckpt_dir: Path, step: int, overrides: list[str] = TINY_MODEL, world: int = 1) -> Path:
    """A checkpoint in DeepSpeed's layout, each rank's files with their manifest, then `latest`
    names it (as a save does)."""
    tag_dir = ckpt_dir / step_tag(step)
    tag_dir.mkdir(parents=True)
    for rank in range(world):
        names = [f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt", f"rng_rank{rank}.pt"]
        if rank == 0:
            names += ["mp_rank_00_model_states.pt", "model.safetensors"]
            (tag_dir / "config.json").write_text(json.dumps(config_to_dict(load_config(None, overrides))))
        for i, name in enumerate(names):
            (tag_dir / name).write_bytes(os.urandom(3000 + 1000 * i))
        write_manifest(tag_dir, rank, world, step, names + (["config.json"] if rank == 0 else []))
    write_latest(ckpt_dir, tag_dir.name)
    return tag_dir


def resume_cfg(out: Path, *extra: str):
    return load_config(None, [*TINY_MODEL, f"train.out_dir={out}", *extra])


def test_manifest_finds_missing_truncated_and_corrupted_files(tmp_path):
    tag_dir = fake_checkpoint(tmp_path, 4, world=2)
    record = json.loads((tag_dir / manifest_name(1)).read_text())["files"]["rng_rank1.pt"]
    assert record == {"bytes": 4000, "blake2b": file_digest(tag_dir / "rng_rank1.pt")}
    import hashlib

    assert record["blake2b"] == hashlib.blake2b((tag_dir / "rng_rank1.pt").read_bytes()).hexdigest()
    assert checkpoint_problem(tag_dir) is None

    model = tag_dir / "model.safetensors"
    data = model.read_bytes()
    model.write_bytes(data[:100])
    assert checkpoint_problem(tag_dir) == f"{model} has 100 bytes, {len(data)} were written (truncated or overwritten)"
    model.write_bytes(bytes([data[0] ^ 1]) + data[1:])  # same size, one bit flipped
    assert str(model) in checkpoint_problem(tag_dir) and "checksum" in checkpoint_problem(tag_dir)
    model.write_bytes(data)
    (tag_dir / manifest_name(1)).unlink()  # rank 1 died before finishing its part
    assert "rank 1 did not finish" in checkpoint_problem(tag_dir)


def test_resume_skips_a_damaged_checkpoint_with_a_warning_naming_file_and_step(tmp_path, caplog):
    ckpt = tmp_path / "checkpoints"
    fake_checkpoint(ckpt, 2)
    newest = fake_checkpoint(ckpt, 4)
    (ckpt / "step9").mkdir()  # a crashed save's leftover, newer than `latest`: never a candidate
    state = newest / "mp_rank_00_model_states.pt"
    os.truncate(state, 10)
    with caplog.at_level(logging.WARNING):
        assert find_resume_step(resume_cfg(tmp_path), ckpt) == 2
    warning = caplog.text
    assert str(state) in warning and "step 4" in warning and "resuming from step 2" in warning
    assert latest_tag(ckpt) == "step4"  # the next save of step 4 replaces the damaged files

    os.truncate(ckpt / "step2" / "model.safetensors", 0)
    with pytest.raises(CheckpointError) as info:
        find_resume_step(resume_cfg(tmp_path), ckpt)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"no complete checkpoint left in {ckpt}")
    assert str(state) in message and str(ckpt / "step2" / "model.safetensors") in message


def test_checkpoint_without_manifest_from_an_earlier_version_still_resumes(tmp_path):
    ckpt = tmp_path / "checkpoints"
    tag_dir = fake_checkpoint(ckpt, 3)
    (tag_dir / manifest_name(0)).unlink()
    assert find_resume_step(resume_cfg(tmp_path), ckpt) == 3


def test_changed_model_is_refused_naming_the_keys_before_any_weight_is_read(tmp_path):
    ckpt = tmp_path / "checkpoints"
    tag_dir = fake_checkpoint(ckpt, 2)
    os.truncate(tag_dir / "mp_rank_00_model_states.pt", 0)  # nothing is loaded: the config decides
    fake_checkpoint(ckpt, 4)
    cfg = resume_cfg(tmp_path, "model.vision.width=64", "model.text.depth=3", "model.vision.grad_checkpointing=true",
                     "model.vision.attention=sdpa")
    with pytest.raises(ConfigError) as info:
        find_resume_step(cfg, ckpt)
    message = str(info.value)
    assert "model.vision.width: 32 -> 64" in message and "model.text.depth: 4 -> 3" in message
    assert "grad_checkpointing" not in message and "attention" not in message  # how it runs may change
    assert str(ckpt / "step4" / "config.json") in message and "\n" not in message
    # only settings that leave the weights alone: resumes
    assert find_resume_step(resume_cfg(tmp_path, "model.vision.grad_checkpointing=true"), ckpt) == 4


@pytest.mark.parametrize("content, error", [("", InputError), ("tensorboard", CheckpointError)])
def test_damaged_latest_is_a_user_error(tmp_path, content, error):
    ckpt = tmp_path / "checkpoints"
    fake_checkpoint(ckpt, 2)
    (ckpt / "tensorboard").mkdir()
    (ckpt / "latest").write_text(content)
    with pytest.raises(error) as info:
        find_resume_step(resume_cfg(tmp_path), ckpt)
    assert str(ckpt / "latest") in str(info.value) and "stepN" in str(info.value)


def _decide_on_every_rank(rank: int, port: int, root: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    results = {}
    for case in sorted(p.name for p in Path(root).iterdir() if p.is_dir()):
        try:
            results[case] = find_resume_step(resume_cfg(Path(root) / case), Path(root) / case / "checkpoints")
        except UserError as exc:
            results[case] = f"{type(exc).__name__}: {exc}"
    Path(root, f"rank{rank}.json").write_text(json.dumps(results))
    torch.distributed.barrier()  # a rank that tears down while its peer still sends can abort inside gloo
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_every_rank_takes_rank_zeros_decision(tmp_path):
    """Rank 0 alone reads the checkpoints; a refusal is raised on every rank (no rank waits for a
    decision that never comes), and a fallback is taken by every rank."""
    fake_checkpoint(tmp_path / "fresh" / "checkpoints", 1).parent.joinpath("latest").unlink()
    fake_checkpoint(tmp_path / "empty_latest" / "checkpoints", 1).parent.joinpath("latest").write_text("")
    fake_checkpoint(tmp_path / "fallback" / "checkpoints", 2, world=2)
    os.truncate(fake_checkpoint(tmp_path / "fallback" / "checkpoints", 4, world=2) / "rng_rank1.pt", 5)
    fake_checkpoint(tmp_path / "other_model" / "checkpoints", 2, overrides=["model.vision.depth=2"])
    spawn_and_wait(_decide_on_every_rank, (free_port(), str(tmp_path)), nprocs=2, timeout=120, what="two ranks")
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0 == rank1
    assert rank0["fresh"] == -1 and rank0["fallback"] == 2
    assert rank0["empty_latest"].startswith("InputError: ") and "is empty" in rank0["empty_latest"]
    assert rank0["other_model"].startswith("ConfigError: ") and "model.vision.depth: 2 -> 1" in rank0["other_model"]


def test_model_safetensors_has_the_permissions_of_the_other_checkpoint_files(tmp_path):
    engine = types.SimpleNamespace(module=torch.nn.Linear(3, 2))  # what save_model_file reads of an engine
    assert save_model_file(engine, tmp_path, stage=0) == "model.safetensors"
    save_rng_state(tmp_path, 0)
    mode = (tmp_path / "model.safetensors").stat().st_mode & 0o777
    assert mode == (tmp_path / "rng_rank0.pt").stat().st_mode & 0o777 == new_file_mode()
    previous = os.umask(0o027)
    try:
        save_model_file(engine, tmp_path, stage=0)
        assert (tmp_path / "model.safetensors").stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(previous)


def test_a_full_disk_is_refused_before_writing_with_the_space_a_checkpoint_needs(tmp_path, monkeypatch):
    ckpt = tmp_path / "checkpoints"
    size = sum(p.stat().st_size for p in fake_checkpoint(ckpt, 2).iterdir() if not p.name.startswith("manifest"))
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=size - 1))
    with pytest.raises(DiskFullError) as info:
        ensure_free_space(ckpt, ckpt / "step4")
    message = str(info.value)
    assert message.startswith(f"no space left on device writing checkpoint step4 to {ckpt / 'step4'}: ")
    assert f"about {size / 1024:.1f} KiB (the size of step2)" in message and "resume from step2" in message
    assert not (ckpt / "step4").exists() and latest_tag(ckpt) == "step2"
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=size))
    ensure_free_space(ckpt, ckpt / "step4")


def test_write_failures_that_mean_a_full_disk(tmp_path, monkeypatch):
    fake_checkpoint(tmp_path, 2)
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"), tmp_path)
    assert is_disk_full(Exception("Error while serializing: I/O error: No space left on device (os error 28)"),
                        tmp_path)
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"), tmp_path)
    # torch.save's bare failure counts only where the filesystem has no room for a checkpoint
    assert not is_disk_full(RuntimeError("unexpected pos 576 vs 534"), tmp_path)
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=100))
    assert is_disk_full(RuntimeError("unexpected pos 576 vs 534"), tmp_path)
    message = disk_full_message(tmp_path, tmp_path / "step4", OSError(errno.ENOSPC, "full", str(tmp_path / "x.pt")))
    assert f"to {tmp_path / 'x.pt'}: " in message and "100 bytes free" in message


# --- through the CLI ------------------------------------------------------------------------------

#: `navit-clip train` whose writes into a step4 checkpoint fail as on a full disk
FULL_DISK_AT_STEP4 = """
import errno, sys, torch
from navit_clip import cli
save = torch.save
def save_on_a_full_disk(obj, f, *args, **kwargs):
    if "step4" in str(f):
        raise OSError(errno.ENOSPC, "No space left on device", str(f))
    return save(obj, f, *args, **kwargs)
torch.save = save_on_a_full_disk
sys.exit(cli.main(sys.argv[1:]))
"""


def run_train(shards: str, out: Path, steps: int, inject: str | None = None):
    import subprocess
    import sys

    from processes import TINY_TRAIN

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    start = ["-c", inject] if inject else ["-m", "navit_clip"]
    return subprocess.run([sys.executable, *start, "train", *TINY_TRAIN, "optim.warmup_steps=2",
                           f"data.train_shards={shards}", f"train.out_dir={out}", f"train.steps={steps}",
                           "train.ckpt_every=1", "train.extend=true"], capture_output=True, text=True, timeout=400, env=env)


@pytest.mark.slow
def test_cli_resumes_past_a_truncated_checkpoint_and_stops_cleanly_on_a_full_disk(tmp_path):
    from navit_clip.data.digits import make_digit_shards

    shards = make_digit_shards(tmp_path / "digits", train_copies=1, eval_per_class=2, max_train_digits=100,
                               shards_train=2, shards_eval=1)["train_shards"]
    run, ckpt = tmp_path / "run", tmp_path / "run" / "checkpoints"
    assert run_train(shards, run, steps=2).returncode == 0
    assert (ckpt / "step2" / "model.safetensors").stat().st_mode & 0o777 == new_file_mode()

    damaged = ckpt / "step2" / "mp_rank_00_model_states.pt"
    os.truncate(damaged, damaged.stat().st_size // 2)
    proc = run_train(shards, run, steps=3)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout[proc.stdout.index("{"):])["resumed_from"] == 1
    warning = next(line for line in proc.stderr.splitlines() if "damaged" in line)
    assert str(damaged) in warning and "step 2" in warning and "resuming from step 1" in warning
    assert latest_tag(ckpt) == "step3" and checkpoint_problem(ckpt / "step2") is None  # step 2 written again

    proc = run_train(shards, run, steps=4, inject=FULL_DISK_AT_STEP4)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith(f"navit-clip train: error: no space left on device writing checkpoint step4 to {ckpt}")
    assert "(the size of step3)" in error and "resume from step3" in error
    assert latest_tag(ckpt) == "step3"
    # after freeing space, the same command resumes from the last complete checkpoint
    proc = run_train(shards, run, steps=4)
    assert proc.returncode == 0 and json.loads(proc.stdout[proc.stdout.index("{"):])["resumed_from"] == 3


def test_eval_and_export_name_a_damaged_checkpoint_file(tmp_path):
    from navit_clip.train.checkpoint import load_model_state

    ckpt = tmp_path / "checkpoints"
    tag_dir = fake_checkpoint(ckpt, 2)
    os.truncate(tag_dir / "model.safetensors", 7)
    with pytest.raises(CheckpointError, match=f"checkpoint step2 is damaged: {tag_dir / 'model.safetensors'} has 7 bytes"):
        load_model_state(ckpt)
