"""Resuming a partitioned optimizer (ZeRO stages 1-3) on a different number of ranks.

ZeRO keeps one slice of the fp32 weights and the Adam moments per rank, cut to the world size
that wrote them, so DeepSpeed loads them back only on that world size. Its universal checkpoint
stores the same state per parameter instead (`zero/<name>/fp32.pt, exp_avg.pt, ...`), which any
world size can re-slice. When a run resumes a ZeRO >= 1 checkpoint on another world size, rank 0
converts the checkpoint once (DeepSpeed's `ds_to_universal`, into `<step dir>/universal`, written
under a temporary name and renamed when complete, so a crash mid-way leaves nothing half-made),
the other ranks wait for it, and every rank loads the converted copy. Checkpoints of the same
world size load as they are; ZeRO stage 0 needs no conversion (its optimizer state is whole).

DeepSpeed's converter and its universal loader read files with `torch.load(weights_only=False)`;
here they run with every `torch.load` forced to `weights_only=True` (plus DeepSpeed's plain-data
classes), as our checkpoint engine loads everything else.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from navit_clip import dist
from navit_clip.errors import CheckpointError, UserError
from navit_clip.train.checkpoint import safe_load, step_tag
from navit_clip.train.manifest import saved_world_size

log = logging.getLogger(__name__)

#: the converted copy's directory inside a step checkpoint (removed with it by pruning)
UNIVERSAL_DIR = "universal"
_COMPLETE = "converted.ok"  # written last into the converted copy


def needs_universal(tag_dir: Path, stage: int) -> bool:
    """Whether this checkpoint's optimizer state is partitioned for another world size than ours.
    A checkpoint without manifests (written by an earlier version) does not say its world size: it
    loads as it is, and DeepSpeed refuses a mismatch itself."""
    saved = saved_world_size(tag_dir)
    return stage >= 1 and saved is not None and saved != dist.world_size()


@contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every torch.load inside the block is our checkpoint loader (`safe_load`: weights_only=True),
    whatever its caller asked."""
    original = torch.load

    def load(f: Any, map_location: Any = None, *, weights_only: Any = None, **options: Any) -> Any:
        return safe_load(f, map_location, **options)

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


def resume_through_universal(ckpt_dir: Path, step: int, stage: int) -> bool:
    """Whether the checkpoint of `step` (-1: none) must load through its universal copy; if so,
    rank 0 converts it first (or reuses an earlier complete conversion). Rank 0 decides, and every
    rank gets its decision or its error, so that no rank waits for a conversion that failed."""
    outcome: bool | UserError = False
    if dist.is_main() and step >= 0 and needs_universal(tag_dir := ckpt_dir / step_tag(step), stage):
        try:
            convert(tag_dir, tag_dir / UNIVERSAL_DIR)
            outcome = True
        except Exception as exc:  # noqa: BLE001 - every rank must hear of it, not wait for it
            log.error("converting %s to a universal checkpoint failed", tag_dir, exc_info=exc)
            outcome = CheckpointError(f"cannot resume {tag_dir.name} on {dist.world_size()} ranks: converting it to "
                                      f"DeepSpeed's universal checkpoint failed ({type(exc).__name__}: {exc}); "
                                      f"resume on {saved_world_size(tag_dir)} ranks instead")
    outcome = dist.broadcast_object(outcome)
    if isinstance(outcome, UserError):
        raise outcome
    return outcome


def convert(tag_dir: Path, target: Path) -> None:
    """Run DeepSpeed's ds_to_universal on tag_dir into target, unless a complete copy is there."""
    if (target / _COMPLETE).exists():
        log.info("resuming through the universal checkpoint converted earlier: %s", target)
        return
    from deepspeed.checkpoint import ds_to_universal

    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    log.warning("converting %s (written by %s ranks) to a universal checkpoint for %d ranks ...",
                tag_dir, saved_world_size(tag_dir), dist.world_size())
    started = time.perf_counter()
    # one process: the converter's worker pools would start processes inside a launched rank
    args = argparse.Namespace(input_folder=str(tag_dir), output_folder=str(partial), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True,
                              # checkpoints of plain data-parallel models lack only the format version
                              inject_missing_state=True)
    try:
        with weights_only_loads():
            ds_to_universal.main(args)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    (partial / _COMPLETE).write_text("complete\n")
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    log.warning("converted in %.1f s", time.perf_counter() - started)
