"""Resuming on a different number of ranks or DataLoader workers.

Every checkpoint keeps each rank's data-stream positions (gathered to every rank before the save:
DeepSpeed writes the client state from rank 0 only). A run restarted with the checkpoint's
layout resumes each worker at its own position, bit-exact; with another layout the epoch's unread
shards and the samples in flight are re-split over the new readers (data/elastic.py) and the
accounting is logged, written to metrics.jsonl and kept in the next checkpoints.

Model and optimizer: with ZeRO stage 0 both are replicated and saved whole by rank 0, so every
new rank loads them as they are. ZeRO stages 1-3 partition the optimizer state per rank; DeepSpeed
loads it only on the world size that wrote it (its universal checkpoint, converted offline with
`ds_to_universal.py`, is the way across), so a different world size is refused there.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from navit_clip import dist
from navit_clip.data.elastic import rank_stream_state
from navit_clip.data.loader import ResumableBatches
from navit_clip.data.spec import StreamSpec
from navit_clip.errors import CheckpointError
from navit_clip.train.manifest import saved_world_size

log = logging.getLogger(__name__)

#: stream-identity keys an elastic resume may change
LAYOUT_KEYS = ("world_size", "num_workers")


def check_model_layout(tag_dir: Path, stage: int) -> None:
    """Refuse, before DeepSpeed loads anything, a world size other than the checkpoint's when the
    optimizer state is partitioned per rank (ZeRO stage >= 1)."""
    saved, world = saved_world_size(tag_dir), dist.world_size()
    if stage == 0 or saved is None or saved == world:
        return
    raise CheckpointError(f"cannot resume {tag_dir.name} on {world} ranks: it was written by {saved} ranks under "
                          f"ZeRO stage {stage}, which partitions the optimizer state per rank, and navit-clip does not "
                          f"load DeepSpeed universal checkpoints (ds_to_universal.py); resume on {saved} ranks, or "
                          "train with ZeRO stage 0 (configs/deepspeed/cpu.json) to change the number of ranks")


def checkpoint_stream_state(batches: ResumableBatches, stream_id: dict[str, Any],
                            elastic: dict[str, Any] | None) -> dict[str, Any]:
    """The data state a checkpoint keeps: every rank's worker positions (a collective: every rank
    calls it), the stream's identity, and the elastic resume this run made, if any."""
    state = batches.state_dict()
    ranks = dist.all_gather_object(state["workers"])
    saved = {"batches": state["batches"], "ranks": ranks, "stream": stream_id}
    if elastic is not None:
        saved["elastic_resume"] = elastic
    return saved


def resumed_stream_state(data_state: dict[str, Any] | None, spec: StreamSpec,
                         num_workers: int) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(the state this rank's stream resumes from, the elastic resume's accounting or None)."""
    if data_state is None:
        return None, None
    state, report = rank_stream_state(data_state, dist.rank(), dist.world_size(), num_workers,
                                      spec.sources.resampled)
    if report is not None and dist.is_main():
        if report.get("resampled"):
            log.warning("resuming elastically: %s -> %s ranks x workers; the stream is resampled (shards drawn "
                        "with replacement), so the new readers start drawing afresh", report["from"], report["to"])
        else:
            log.warning("resuming elastically: %s -> %s ranks x workers; the unread rest of epoch %d (%d pieces of "
                        "shards) and %d in-flight samples re-split over %d readers: samples_replayed=%d "
                        "samples_skipped=%d samples_requeued=%d", report["from"], report["to"], report["epoch"],
                        report["pieces"], report["samples_requeued"], report["new_readers"],
                        report["samples_replayed"], report["samples_skipped"], report["samples_requeued"])
    return state, report
