"""One training run per `train.out_dir`: two runs on one folder would truncate each other's
metrics.jsonl and write the same checkpoint tags.

Rank 0 holds an exclusive `flock` on `train.out_dir/.lock` for the whole run. The kernel drops a
flock when its process dies, so a crashed run (kill -9, a lost node's process) never leaves the
folder stuck: the next run simply takes the lock, and warns that the previous holder ended
without releasing it. The file's JSON body only names the holder (host, pid, start time) for the
message a refused run prints; a clean release empties it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, Iterator

from navit_clip import dist
from navit_clip.config import ConfigError
from navit_clip.errors import UserError

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"


class RunDirInUseError(UserError):
    """Another training run holds train.out_dir."""


def describe_holder(body: dict[str, Any]) -> str:
    """'host H, pid P, started T' from a lock file's body (parts it lacks are left out)."""
    parts = [f"{name} {body[key]}" for key, name in (("host", "host"), ("pid", "pid"), ("started", "started"))
             if key in body]
    return ", ".join(parts) or "holder unknown"


def _read_body(fd: int) -> dict[str, Any]:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = b""
    while chunk := os.read(fd, 65536):
        raw += chunk
    try:
        body = json.loads(raw.decode("utf-8")) if raw.strip() else {}
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {"unreadable": True}
    return body if isinstance(body, dict) else {"unreadable": True}


def _write_body(fd: int, body: dict[str, Any]) -> None:
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    if body:
        os.write(fd, (json.dumps(body) + "\n").encode("utf-8"))
    os.fsync(fd)


class RunLock:
    """An exclusive, process-lifetime lock on one run directory."""

    def __init__(self, out_dir: str | Path) -> None:
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        """Take the lock or raise RunDirInUseError naming its holder; take over a dead run's lock."""
        check_out_dir(self.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = describe_holder(_read_body(fd))
            os.close(fd)
            raise RunDirInUseError(f"train.out_dir {self.out_dir} is in use by another training run ({holder}); "
                                   "wait for it to end or stop it, or choose another train.out_dir") from None
        previous = _read_body(fd)
        if previous:
            log.warning("train.out_dir %s: taking over the lock of a run that ended without releasing it (%s)",
                        self.out_dir, describe_holder(previous))
        _write_body(fd, {"host": socket.gethostname(), "pid": os.getpid(),
                         "started": time.strftime("%Y-%m-%d %H:%M:%S %z")})
        self._fd = fd
        return self

    def release(self) -> None:
        """Empty the holder's name (a clean end) and drop the lock."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            _write_body(fd, {})
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)  # also for copies of the descriptor in forked workers
            os.close(fd)


def check_out_dir(out_dir: Path) -> None:
    """train.out_dir must be a folder (or not exist yet): refused before anything is built."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"train.out_dir {out_dir} is a file, not a folder; choose a folder for the run")


@contextlib.contextmanager
def hold_run_dir(out_dir: str | Path) -> Iterator[None]:
    """Hold train.out_dir for the run: rank 0 checks the folder and takes the lock, and every rank
    fails together when it cannot (the other ranks learn it through a broadcast)."""
    out_dir = Path(out_dir)
    lock, error = RunLock(out_dir), None
    if dist.is_main():
        try:
            lock.acquire()
        except UserError as exc:
            error = exc
    if not dist.broadcast_int(0 if error else 1):
        raise error or RunDirInUseError(f"rank 0 could not take the lock of train.out_dir {out_dir} (see its error)")
    try:
        yield
    finally:
        lock.release()
