"""Data failures every rank agrees on.

A rank whose data fails (all its shards unreadable, a missing file, a shard list that yields
nothing) must not leave the other ranks waiting in the next collective until the launcher's
timeout. Every rank fetches its data through `agreed`, which ends in one tiny all-reduce of a
failure flag per rank; when any rank failed, the first failing rank's message goes to all of
them and every rank raises the same RankDataError ("rank 1: no usable sample in shard ...").
"""

from __future__ import annotations

import logging
from typing import Callable, TypeVar

from navit_clip import dist
from navit_clip.data.loader import from_worker
from navit_clip.errors import RankDataError, UserError

log = logging.getLogger(__name__)

T = TypeVar("T")


def agreed(fetch: Callable[[], T], discard: Callable[[T], None] | None = None) -> T:
    """fetch() on every rank, or the same RankDataError on every rank if it failed on any.

    `discard` releases what fetch() returned on a rank whose own fetch succeeded (e.g. stops
    its DataLoader workers) before that rank raises its peer's error.
    """
    try:
        value, failure = fetch(), None
    except Exception as exc:  # noqa: BLE001 - any failure must reach the other ranks
        value, failure = None, exc
    failing = dist.first_failing_rank(failure is not None)
    if failing is None:
        return value  # type: ignore[return-value]
    if dist.world_size() == 1:
        raise from_worker(failure) if isinstance(failure, UserError) else failure  # type: ignore[misc]
    message = dist.broadcast_object(_describe(failure) if dist.rank() == failing else None, src=failing)
    error = RankDataError(f"rank {failing}: {message}")
    if failure is None:
        if discard is not None:
            discard(value)  # type: ignore[arg-type]
        raise error
    if not isinstance(failure, UserError):  # a bug: its traceback stays in this rank's log
        log.error("rank %d: reading data failed", dist.rank(), exc_info=failure)
    elif dist.rank() != failing:
        log.error("rank %d: %s", dist.rank(), _describe(failure))
    raise error from failure


def _describe(exc: BaseException | None) -> str:
    """The failure as one line: a user error's message, or a bug's type and first line."""
    if isinstance(exc, UserError):
        return str(from_worker(exc))
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")
