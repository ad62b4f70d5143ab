"""Writing a checkpoint: every rank writes its files and then its manifest (their sizes and
checksums); only after a barrier that follows every rank's writes does `latest` name the step. A
full disk is a one-line error saying how much space a checkpoint needs, and `latest` stays on the
last complete checkpoint, from which rerunning the same command resumes."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

from navit_clip import dist
from navit_clip.config import Config, config_to_dict
from navit_clip.errors import DiskFullError
from navit_clip.train.checkpoint import (latest_tag, prune_checkpoints, save_model_file, save_rng_state, step_tag,
                                        write_latest)
from navit_clip.train.manifest import checkpoint_bytes, write_manifest

CONFIG_FILE = "config.json"  # the run's config as this checkpoint was written, for the resume check


def save_checkpoint(engine, ckpt_dir: Path, step: int, data_state: dict, cfg: Config, stage: int) -> None:
    """Every rank writes its part and its manifest; only then does `latest` name the new checkpoint.
    A full disk (before or while writing) raises DiskFullError on the rank that meets it."""
    tag_dir = ckpt_dir / step_tag(step)
    ensure_free_space(ckpt_dir, tag_dir)
    try:
        files = write_checkpoint_files(engine, tag_dir, step, data_state, cfg, stage)
        write_manifest(tag_dir, dist.rank(), dist.world_size(), step, files)
        dist.barrier()  # every rank's files are written before `latest` may name them
        if dist.is_main():
            write_latest(ckpt_dir, tag_dir.name)
            prune_checkpoints(ckpt_dir, cfg.train.keep_checkpoints)
    except Exception as exc:
        if is_disk_full(exc, ckpt_dir):
            raise DiskFullError(disk_full_message(ckpt_dir, tag_dir, exc)) from exc
        raise
    dist.barrier()


def write_checkpoint_files(engine, tag_dir: Path, step: int, data_state: dict, cfg: Config, stage: int) -> list[str]:
    """DeepSpeed's files, model.safetensors, config.json (rank 0) and this rank's generators ->
    the names (inside tag_dir) of the files this rank wrote."""
    saver = engine.checkpoint_engine
    if hasattr(saver, "take_written"):
        saver.take_written()  # forget files of an earlier, failed save
    config = config_to_dict(cfg)
    engine.save_checkpoint(str(tag_dir.parent), tag=tag_dir.name, save_latest=False,
                           client_state={"step": step, "data": data_state, "config": config})
    written = [os.path.relpath(p, tag_dir) for p in saver.take_written()] if hasattr(saver, "take_written") else []
    model_file = save_model_file(engine, tag_dir, stage)  # a collective under ZeRO-3
    if model_file is not None:
        written.append(model_file)
    written.append(save_rng_state(tag_dir, dist.rank()))
    if dist.is_main():
        tmp = tag_dir / (CONFIG_FILE + ".tmp")
        tmp.write_text(json.dumps(config, indent=2))
        os.replace(tmp, tag_dir / CONFIG_FILE)
        written.append(CONFIG_FILE)
    return written


def _human(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def space_needed(ckpt_dir: Path) -> tuple[int, str] | None:
    """Bytes a new checkpoint needs, estimated as the size of the one `latest` names (it holds the
    same tensors) -> (bytes, that step's tag), or None before the first checkpoint."""
    try:
        tag = latest_tag(ckpt_dir)
    except Exception:  # noqa: BLE001 - a damaged `latest` is reported on resume, not here
        return None
    return None if tag is None else (checkpoint_bytes(ckpt_dir / tag), tag)


def free_bytes(path: Path) -> int:
    """Free space (for this user) on the filesystem holding path or its nearest existing parent."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def ensure_free_space(ckpt_dir: Path, tag_dir: Path) -> None:
    """Refuse, before writing anything, a checkpoint that cannot fit: less free space than the
    previous checkpoint takes. Rank 0 decides for all, so that no rank starts a save alone."""
    message = None
    if dist.is_main():
        needed = space_needed(ckpt_dir)
        if needed is not None and free_bytes(ckpt_dir) < needed[0]:
            message = disk_full_message(ckpt_dir, tag_dir, None)
    message = dist.broadcast_object(message)
    if message is not None:
        raise DiskFullError(message)


def is_disk_full(exc: BaseException, ckpt_dir: Path) -> bool:
    """Whether a failed write ran out of space: ENOSPC/EDQUOT, an error of safetensors that says so,
    or torch.save's bare "unexpected pos" failure on a filesystem left without room for a
    checkpoint."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if "No space left on device" in str(exc) or "os error 28" in str(exc):
        return True
    if isinstance(exc, RuntimeError):
        needed = space_needed(ckpt_dir)
        try:
            return free_bytes(ckpt_dir) < (needed[0] if needed else 64 << 20)
        except OSError:
            return False
    return False


def disk_full_message(ckpt_dir: Path, tag_dir: Path, exc: BaseException | None) -> str:
    """One line: the path, the space a checkpoint needs and the space free, what to do."""
    where = getattr(exc, "filename", None) or tag_dir
    needed = space_needed(ckpt_dir)
    if needed is not None:
        need = f"a checkpoint needs about {_human(needed[0])} (the size of {needed[1]})"
        resume = f"rerun the same command to resume from {needed[1]}, which `latest` still names"
    else:
        written = sum(p.stat().st_size for p in tag_dir.rglob("*") if p.is_file()) if tag_dir.exists() else 0
        need = f"the first checkpoint needs more than the {_human(written)} written before the disk filled"
        resume = "rerun the same command (no checkpoint was complete yet, so it starts over)"
    try:
        free = f"{_human(free_bytes(ckpt_dir))} free"
    except OSError:
        free = "free space unknown"
    return (f"no space left on device writing checkpoint {tag_dir.name} to {where}: {need}, {free}; free space "
            f"(or move train.out_dir to a larger disk) and {resume}")
