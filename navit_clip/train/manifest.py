"""What a complete checkpoint is: every rank records the size and checksum of each file it wrote
(`manifest_rank{R}.json`, beside the files, before `latest` may name the step), and resume checks
them, so that a truncated or damaged file is found before anything is loaded from it.

The checksum is BLAKE2b over 1 MiB chunks. It is cheap enough: hashlib releases the GIL and
hashes at about 1 GB/s per core, each rank hashes only its own files (in parallel with the
others) right after writing them, while they are still in the page cache, and resume reads each
file once more, in parallel threads, at about the speed that loading it takes anyway.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable

CHUNK = 1 << 20


def manifest_name(rank: int) -> str:
    return f"manifest_rank{rank}.json"


def file_digest(path: str | Path) -> str:
    """BLAKE2b (hex) of a file's bytes, read in 1 MiB chunks (constant memory for any size)."""
    digest = hashlib.blake2b()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(tag_dir: str | Path, rank: int, world_size: int, step: int, files: Iterable[str]) -> Path:
    """Record size and checksum of `files` (names inside tag_dir) written by this rank. Written
    atomically and last, so that a rank's manifest exists only once all its files do."""
    tag_dir = Path(tag_dir)
    names = sorted(set(files))
    entries = {name: {"bytes": (tag_dir / name).stat().st_size, "blake2b": file_digest(tag_dir / name)}
               for name in names}
    record = {"step": step, "rank": rank, "world_size": world_size, "files": entries}
    path = tag_dir / manifest_name(rank)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def has_manifest(tag_dir: str | Path) -> bool:
    """Whether the checkpoint was written with manifests (those written before them have none)."""
    return (Path(tag_dir) / manifest_name(0)).exists()


def saved_world_size(tag_dir: str | Path) -> int | None:
    """The number of ranks that wrote the checkpoint (None: written before manifests, or unreadable)."""
    try:
        return int(json.loads((Path(tag_dir) / manifest_name(0)).read_text())["world_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _read_manifests(tag_dir: Path) -> tuple[dict[str, dict], str | None]:
    """All ranks' file records -> ({name: record}, a problem or None)."""
    try:
        first = json.loads((tag_dir / manifest_name(0)).read_text())
        world = int(first["world_size"])
        records = {}
        for rank in range(world):
            path = tag_dir / manifest_name(rank)
            if not path.exists():
                return {}, f"{path} is missing (rank {rank} did not finish writing)"
            records.update(json.loads(path.read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return {}, f"its manifest in {tag_dir} is unreadable ({exc})"
    return records, None


def _file_problem(path: Path, record: dict) -> str | None:
    if not path.exists():
        return f"{path} is missing"
    size = path.stat().st_size
    if size != record["bytes"]:
        return f"{path} has {size} bytes, {record['bytes']} were written (truncated or overwritten)"
    if file_digest(path) != record["blake2b"]:
        return f"{path} does not match the checksum recorded when it was written (corrupted)"
    return None


def checkpoint_problem(tag_dir: str | Path, only: Iterable[str] | None = None) -> str | None:
    """Why the checkpoint in tag_dir is not complete (a missing manifest or file, a file whose size
    or checksum differs from the recorded one), or None when every recorded file (or each of
    `only` that is recorded) checks out. Sizes are compared first; files are hashed in parallel
    threads."""
    tag_dir = Path(tag_dir)
    if not has_manifest(tag_dir):
        return f"{tag_dir / manifest_name(0)} is missing (the save did not finish)"
    records, problem = _read_manifests(tag_dir)
    if problem:
        return problem
    if only is not None:
        records = {name: records[name] for name in only if name in records}
    for name, record in records.items():  # cheap checks first: a truncated file needs no hashing
        path = tag_dir / name
        if not path.exists() or path.stat().st_size != record["bytes"]:
            return _file_problem(path, record)
    workers = min(8, os.cpu_count() or 1, max(1, len(records)))
    with ThreadPoolExecutor(workers) as pool:
        problems = pool.map(lambda item: _file_problem(tag_dir / item[0], item[1]), sorted(records.items()))
        return next((p for p in problems if p), None)


def checkpoint_bytes(tag_dir: str | Path) -> int:
    """Total size of a checkpoint's files (as recorded, or on disk for one without manifests)."""
    tag_dir = Path(tag_dir)
    records, problem = _read_manifests(tag_dir) if has_manifest(tag_dir) else ({}, "none")
    if not problem:
        return sum(r["bytes"] for r in records.values())
    return sum(p.stat().st_size for p in tag_dir.rglob("*") if p.is_file())
