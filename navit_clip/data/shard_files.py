"""Tar shard files: raw samples read from them, shards written, and each shard's sample count.

Every writer of shards (`make-shards`, `pack-shards`, the digits set) records how many samples
each shard holds in `sizes.json` beside it. A reader compares what a shard gave with that count:
a shard cut between two samples ends without an error in the tar format, so without the count
its missing tail would go unnoticed. The missing samples are counted as skipped
("truncated_shard").
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import webdataset as wds

if TYPE_CHECKING:
    from navit_clip.data.shards import ReadStats

log = logging.getLogger(__name__)

#: The file beside a folder's shards that records each shard's sample count: {"name.tar": count}.
SIZES_FILE = "sizes.json"


def recorded_counts(directory: str | os.PathLike) -> dict[str, int]:
    """{shard file name: samples} recorded in `directory`; empty when none is recorded or the
    record cannot be read (a reader then simply has nothing to compare with)."""
    path = os.path.join(directory, SIZES_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            counts = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("ignoring the shard sample counts in %s: %s", path, exc)
        return {}
    if not isinstance(counts, dict):
        log.warning("ignoring the shard sample counts in %s: not a JSON object", path)
        return {}
    return {str(k): v for k, v in counts.items() if isinstance(v, int) and not isinstance(v, bool) and v >= 0}


def record_counts(directory: str | os.PathLike, counts: dict[str, int]) -> None:
    """Add `counts` to the directory's record (other writers' shards in the same folder keep theirs)."""
    merged = {**recorded_counts(directory), **counts}
    path = os.path.join(directory, SIZES_FILE)
    partial = f"{path}.partial"
    with open(partial, "w", encoding="utf-8") as f:
        json.dump(dict(sorted(merged.items())), f, indent=2)
    os.replace(partial, path)


def write_shards(samples: Iterable[dict[str, Any]], pattern: str, max_per_shard: int) -> list[str]:
    """Write samples ({'__key__', 'png': bytes, 'txt': str, 'json': dict}) to shards named by
    pattern % i, and record each shard's sample count beside them."""
    directory = os.path.dirname(pattern) or "."
    os.makedirs(directory, exist_ok=True)
    written: list[str] = []
    counts: dict[str, int] = {}

    def finished(path: str) -> None:
        written.append(path)
        counts[os.path.basename(path)] = sink.count

    # A whole-second time stamp: a fractional one costs each member an extended (PAX) header,
    # which doubles the headers every reader parses.
    stamp = int(time.time())
    with wds.ShardWriter(pattern, maxcount=max_per_shard, verbose=0, post=finished, mtime=stamp) as sink:
        for sample in samples:
            sink.write(sample)
    record_counts(directory, counts)
    return written


def read_raw(shards: Iterable[str], stats: ReadStats, stride: int = 1, offset: int = 0, skip: int = 0,
             position: int = 0) -> Iterator[dict[str, Any]]:
    """Yield raw samples ({'__key__', '__url__', '__member__', ext: bytes}) from tar shards,
    skipping broken ones; `__member__` is the sample's place in its shard.

    A reader that keeps every `stride`-th sample from `offset` counts only its own share of a
    shard's missing tail, so that the readers of one shard set count each missing sample once.
    A reader that resumes mid-shard passes over the first shard's `skip` samples without
    yielding them (their bytes are read, nothing is decoded); `position` counts the samples
    its split gave before the first shard.
    """
    shards = list(shards)
    errors = [0]

    def handler(exc: Exception) -> bool:
        errors[0] += 1
        stats.skipped["unreadable_tar_member"] += 1
        shard, why = _unreadable_shard(exc)
        if shard not in shards:
            log.warning("skipping unreadable data: %s", exc)
        else:
            log.warning("skipping unreadable data in shard %s: %s", shard, why)
            stats.unreadable.setdefault(shard, why)
        return True

    records: dict[str, dict[str, int]] = {}
    for number, shard in enumerate(shards):
        opened = wds.tariterators.url_opener([{"url": shard}], handler=handler)
        files = wds.tariterators.tar_file_expander(opened, handler=handler)
        errors[0], read = 0, 0
        passed = skip if number == 0 else 0
        for raw in wds.tariterators.group_by_keys(files, handler=handler):
            read += 1
            if read <= passed:
                continue
            raw["__member__"] = read - 1
            yield raw
        position += read - passed
        missing = _missing_samples(shard, read + errors[0], records)
        if missing:
            mine = sum(1 for p in range(position, position + missing) if p % stride == offset)
            stats.skipped["truncated_shard"] += mine
            log.warning("shard %s ends after %d of its %d recorded samples: %d counted as skipped", shard, read,
                        read + errors[0] + missing, missing)


def _missing_samples(shard: str, accounted: int, records: dict[str, dict[str, int]]) -> int:
    """How many of the shard's recorded samples neither came out of it nor were counted as
    unreadable (0 when no count is recorded, e.g. for a remote shard)."""
    if "://" in shard or shard.startswith("pipe:"):
        return 0
    directory = os.path.dirname(shard) or "."
    if directory not in records:
        records[directory] = recorded_counts(directory)
    expected = records[directory].get(os.path.basename(shard))
    return max(0, expected - accounted) if expected is not None else 0


def _unreadable_shard(exc: Exception) -> tuple[str | None, str]:
    """(shard, why) from an error of webdataset's tar reader, which appends the shard's URL to
    the error's arguments; an OSError names its file."""
    args = getattr(exc, "args", ())
    if len(args) >= 2 and isinstance(args[-1], str) and isinstance(args[0], str):
        why = {"empty file": "an empty file", "invalid header": "not a tar archive"}.get(args[0], args[0])
        return args[-1], why
    if isinstance(exc, OSError) and exc.filename:
        return str(exc.filename), exc.strerror or str(exc)
    return None, str(exc)
