"""Resuming on a different number of ranks or DataLoader workers.

Every checkpoint keeps each rank's data-stream positions (gathered to every rank before the save:
DeepSpeed writes the client state from rank 0 only). A run restarted with the checkpoint's
layout resumes each worker at its own position, bit-exact; with another layout the epoch's unread
shards and the samples in flight are re-split over the new readers (data/elastic.py) and the
accounting is logged, written to metrics.jsonl and kept in the next checkpoints.

Model and optimizer: with ZeRO stage 0 both are replicated and saved whole by rank 0, so every
new rank loads them as they are. ZeRO stages 1-3 partition the optimizer state per rank; on a new
world size such a checkpoint loads through DeepSpeed's universal checkpoint (train/universal.py).
"""

from __future__ import annotations

import logging
from typing import Any

from navit_clip import dist
from navit_clip.data.elastic import rank_stream_state
from navit_clip.data.loader import ResumableBatches
from navit_clip.data.spec import StreamSpec

log = logging.getLogger(__name__)

#: stream-identity keys an elastic resume may change
LAYOUT_KEYS = ("world_size", "num_workers")


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
