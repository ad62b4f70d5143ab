"""Mistakes a user can make end in one line naming what to fix, never in a traceback or a
corrupted run: a run directory held by another run, a run directory that is a file, YAML syntax
errors, a shard set with nothing usable in it."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import write_tar
from navit_clip.config import ConfigError, load_config
from navit_clip.data.loader import ResumableBatches, make_loader
from navit_clip.data.shards import NoUsableSampleError
from navit_clip.train.run_lock import LOCK_NAME, RunDirInUseError, RunLock, hold_run_dir
from processes import TINY_TRAIN

REPO = Path(__file__).resolve().parents[1]

HOLD_LOCK = """
import sys, time
from navit_clip.train.run_lock import RunLock
RunLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(600)
"""


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT")}
    return {**env, "PYTHONPATH": os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])}


def navit_clip(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "navit_clip", *args], capture_output=True, text=True,
                          timeout=timeout, env=clean_env(), cwd=REPO)


def assert_one_line_error(proc: subprocess.CompletedProcess, command: str, *named: str) -> str:
    """Exit status 2, no traceback, and the error as the last line of stderr; -> that line."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"navit-clip {command}: error: "), proc.stderr[-3000:]
    for text in named:
        assert text in line, line
    return line


@pytest.fixture
def lock_holder(tmp_path):
    """A helper process that holds the run lock of tmp_path/run until it is killed."""
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run)], stdout=subprocess.PIPE, text=True,
                            env=clean_env())
    try:
        assert proc.stdout.readline().strip() == "held"
        yield run, proc
    finally:
        proc.kill()
        proc.wait(timeout=30)


# ------------------------------------------------------------------------------ run lock


def test_second_run_is_refused_naming_the_holder_and_a_killed_holder_is_taken_over(lock_holder, caplog):
    run, holder = lock_holder
    with pytest.raises(RunDirInUseError) as refused:
        RunLock(run).acquire()
    message = str(refused.value)
    assert "\n" not in message
    assert f"pid {holder.pid}" in message and f"host {socket.gethostname()}" in message and "started 20" in message
    assert str(run) in message

    holder.send_signal(signal.SIGKILL)  # a crash: the holder never releases the lock itself
    holder.wait(timeout=30)
    with caplog.at_level(logging.WARNING, logger="navit_clip.train.run_lock"):
        lock = RunLock(run).acquire()
    assert f"pid {holder.pid}" in caplog.text and "ended without releasing" in caplog.text
    body = json.loads((run / LOCK_NAME).read_text())
    assert body["pid"] == os.getpid() and body["host"] == socket.gethostname()
    lock.release()


def test_a_released_lock_is_taken_again_without_a_warning(tmp_path, caplog):
    with hold_run_dir(tmp_path / "run"):
        with pytest.raises(RunDirInUseError, match=f"pid {os.getpid()}"):
            RunLock(tmp_path / "run").acquire()  # another open of the lock file: another holder
    assert (tmp_path / "run" / LOCK_NAME).read_text() == ""
    with caplog.at_level(logging.WARNING, logger="navit_clip.train.run_lock"):
        RunLock(tmp_path / "run").acquire().release()
    assert "without releasing" not in caplog.text


def test_cli_train_refuses_a_held_run_dir_before_writing_to_it(lock_holder):
    run, holder = lock_holder
    rows = "".join(json.dumps({"step": step, "loss": 1.0}) + "\n" for step in (1, 2, 3))
    (run / "metrics.jsonl").write_text(rows)
    proc = navit_clip("train", f"train.out_dir={run}", "data.train_shards=nowhere-{000000..000003}.tar")
    assert_one_line_error(proc, "train", str(run), f"pid {holder.pid}", f"host {socket.gethostname()}")
    assert (run / "metrics.jsonl").read_text() == rows  # the holder's metrics are untouched
    assert not (run / "config.json").exists()


@pytest.mark.slow
def test_cli_train_proceeds_after_the_holder_was_killed(lock_holder, tiny_shards):
    run, holder = lock_holder
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    proc = navit_clip("train", *TINY_TRAIN, f"data.train_shards={tiny_shards.spec}", f"train.out_dir={run}",
                      "train.steps=1", "optim.warmup_steps=1", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"pid {holder.pid}" in proc.stderr and "ended without releasing" in proc.stderr
    assert (run / "checkpoints" / "latest").read_text().strip() == "step1"
    assert (run / LOCK_NAME).read_text() == ""  # released at the end


# ------------------------------------------------------------------------------ train.out_dir a file


def test_out_dir_that_is_a_file_is_refused_before_the_engine_is_built(tmp_path, monkeypatch):
    from navit_clip.train import loop

    def no_engine(cfg):
        raise AssertionError("the engine was built before train.out_dir was checked")

    monkeypatch.setattr(loop.dist, "init_distributed", lambda: None)
    monkeypatch.setattr(loop, "build_engine", no_engine)
    target = tmp_path / "run.txt"
    target.write_text("my notes")
    with pytest.raises(ConfigError, match=r"train\.out_dir .*run\.txt is a file"):
        loop.train(load_config(None, [f"train.out_dir={target}"]))
    assert target.read_text() == "my notes"


def test_cli_train_out_dir_that_is_a_file(tmp_path):
    target = tmp_path / "run.txt"
    target.write_text("my notes")
    proc = navit_clip("train", f"train.out_dir={target}")
    assert_one_line_error(proc, "train", "train.out_dir", str(target))


# ------------------------------------------------------------------------------ YAML syntax


def test_yaml_syntax_error_in_config_file_names_file_line_and_column(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("train:\n  steps: 10\n  lr: [1, 2\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert "\n" not in message and str(path) in message and "line 4, column 1" in message
    assert "<unicode string>" not in message


def test_yaml_syntax_error_in_override_names_the_override():
    with pytest.raises(ConfigError, match=r"override 'train\.steps=\[1'.*not valid YAML") as error:
        load_config(None, ["train.steps=[1"])
    assert "\n" not in str(error.value)


def test_cli_yaml_syntax_errors_are_one_line(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("model:\n  embed_dim: 32\n   vision: {width: 64\n")
    assert_one_line_error(navit_clip("train", "--config", str(path)), "train", str(path), "line 3")
    assert_one_line_error(navit_clip("train", "train.steps=[1"), "train", "train.steps=[1")


# ------------------------------------------------------------------------------ a shard set with nothing usable


def bad_shard(tmp_path: Path, kind: str) -> tuple[str, str]:
    """(path, why) of a shard that holds nothing usable."""
    path = tmp_path / f"{kind}-000000.tar"
    if kind == "empty":
        path.write_bytes(b"")
        return str(path), "an empty file"
    if kind == "garbage":
        path.write_bytes(os.urandom(4096))
        return str(path), "not a tar archive"
    return write_tar(path, [("x.png", b"not a png"), ("x.txt", b"caption")]), "undecodable_image"


@pytest.mark.parametrize("kind", ["empty", "garbage", "broken_samples"])
@pytest.mark.parametrize("workers", [0, 1])
def test_no_usable_sample_is_one_line_naming_the_shard(tmp_path, kind, workers):
    from test_loader import base_spec

    path, why = bad_shard(tmp_path, kind)
    with pytest.raises(NoUsableSampleError) as error:
        next(ResumableBatches(make_loader(base_spec(path, loop=True), num_workers=workers)))
    message = str(error.value)
    assert "\n" not in message and path in message and why in message, message


def test_cli_train_on_a_garbage_shard_is_one_line(tmp_path):
    path, why = bad_shard(tmp_path, "garbage")
    proc = navit_clip("train", *TINY_TRAIN, f"data.train_shards={path}", f"train.out_dir={tmp_path / 'run'}",
                      "train.steps=2")
    assert_one_line_error(proc, "train", path, why)
