"""Helpers for tests that start real processes: a free port, a spawn that cannot hang, and the
overrides of a training run small enough to start several times per test."""

from __future__ import annotations

import socket
import time
from typing import Callable

import pytest

#: a tiny model and batch for `navit-clip train` subprocesses (each test adds its warmup and steps)
TINY_TRAIN = [
    "model.embed_dim=32", "model.vision.width=32", "model.vision.depth=1", "model.vision.heads=2",
    "model.text.width=32", "model.text.depth=1", "model.text.heads=2",
    "data.seq_len=96", "data.max_images=6", "data.sequences_per_batch=2", "data.resolution.max_tokens=32",
    "data.resolution.skip_blank_below=0",  # every patch a token: the loss levels these tests compare were set so
    "data.num_workers=1", "train.log_every=1",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn_and_wait(worker: Callable, args: tuple, nprocs: int, timeout: float, what: str) -> None:
    """torch.multiprocessing.spawn(worker, args, nprocs), failing the test (and killing every
    process) if they have not all finished within `timeout` seconds."""
    import torch.multiprocessing as mp

    ctx = mp.spawn(worker, args=args, nprocs=nprocs, join=False)
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"{what} did not finish within {timeout:.0f} s")
    finally:
        for proc in ctx.processes:
            if proc.is_alive():
                proc.kill()
