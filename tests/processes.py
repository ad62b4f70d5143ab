"""Helpers for tests that start real processes: a free port, and a spawn that cannot hang."""

from __future__ import annotations

import socket
import time
from typing import Callable

import pytest


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
