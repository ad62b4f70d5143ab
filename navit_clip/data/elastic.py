"""Elastic resume of the data stream: the unread rest of every saved reader's epoch, re-split over
a different number of (rank, worker) readers.

A checkpoint holds each old reader's position (data/online.py, data/packed_worker.py). From it
this module computes, as plain data, what is left of the epoch: per source, pieces of splits
(a shard order, the stride and offset of a reader's share, and where to start in it) and the
samples that were in flight (the shuffle pool and the packer's buffers, as sample references).
With one reader per shard set (stride 1) every unread or partly read shard becomes its own
piece, started at its saved sample; a strided reader's rest (fewer shards than readers) stays
one piece, since its samples interleave with other readers' in the same shards. Pieces and
in-flight samples are dealt to the new readers in turn, in a fixed order, so that every unread
sample goes to exactly one new reader and every sample already trained on to none; the in-flight
samples start in their new reader's shuffle pool. Nothing is read twice and nothing is dropped:
the numbers of replayed and skipped samples reported are both zero, and the requeued count says
how many in-flight samples were read again from their shards.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

from navit_clip.errors import UserError

#: (shard index into the stream's shard list, sample index in that shard)
Ref = tuple[int, int]


class ElasticResumeError(UserError):
    """A checkpoint's data stream cannot be re-split over a different number of readers."""


@dataclass
class ElasticPlan:
    """Each new reader's pieces (per source) and in-flight samples, and what the re-split did."""

    old_readers: int
    new_readers: int
    epoch: int  # the epoch the new readers finish; later epochs use the new layout
    pieces: dict[int, list[list[dict]]] = field(default_factory=dict)  # new reader -> per source
    pool: dict[int, list[Ref]] = field(default_factory=dict)  # new reader -> in-flight samples
    requeued: int = 0

    def report(self) -> dict:
        """The accounting a resumed run logs, writes to metrics.jsonl and keeps in its checkpoints."""
        pieces = sum(len(source) for reader in self.pieces.values() for source in reader)
        return {"old_readers": self.old_readers, "new_readers": self.new_readers, "epoch": self.epoch,
                "pieces": pieces, "samples_requeued": self.requeued, "samples_replayed": 0, "samples_skipped": 0}


def packer_refs(packer: dict) -> Iterator[dict]:
    """The references of the images a saved packer held (buffer, open and closed sequences)."""
    yield from packer["buffer"]
    for group in ("open", "closed"):
        for seq in packer[group]:
            yield from seq


def split_pieces(piece: dict) -> list[dict]:
    """The unread rest of one split, from its position: one piece per shard for a stride-1 split
    (the first one started at the samples already read of it), the whole rest for a strided one."""
    place, skip, index = piece["position"]
    rest = list(piece["order"][place:])
    if not rest:
        return []
    if piece["stride"] > 1:
        return [{"order": rest, "stride": piece["stride"], "offset": piece["offset"], "position": [0, skip, index]}]
    return [{"order": [shard], "stride": 1, "offset": 0, "position": [0, skip if n == 0 else 0, 0]}
            for n, shard in enumerate(rest)]


def reader_remainder(state: dict) -> tuple[list[list[dict]], list[Ref]]:
    """(each source's unread pieces, the in-flight samples) of one saved reader position."""
    if state.get("elastic"):  # dealt by an elastic resume, not yet started on
        return [list(pieces) for pieces in state["pieces"]], [(int(r[0]), int(r[1])) for r in state["pool"]]
    items = state["items"]
    if state["kind"] == "packed":
        orders, splits = [state["order"]], [state["split"]]
    else:
        orders, splits = state["orders"], state["splits"]
    sources = []
    for number, position in enumerate(items["readers"]):
        if state.get("pass") == "elastic":  # saved during an elastic pass: already pieces
            pieces = position
        else:
            stride, offset = splits[number]
            pieces = [{"order": orders[number], "stride": stride, "offset": offset, "position": position}]
        sources.append([part for piece in pieces for part in split_pieces(piece)])
    inflight = [(int(ref[0]), int(ref[1])) for ref in items["pool"]]
    if state["kind"] == "raw":
        inflight += [(int(o["shard"]), int(o["member"])) for o in packer_refs(state["packer"])]
    return sources, inflight


def saved_readers(ranks: list[dict]) -> list[dict]:
    """Every old reader's position, in (rank, worker) order; an error if one has none."""
    readers = []
    for rank, workers in enumerate(ranks):
        for worker in sorted(workers, key=int):
            state = workers[worker]
            if state is None:
                raise ElasticResumeError(f"cannot resume on a different number of ranks or workers: rank {rank} "
                                         f"worker {worker} saved no stream position; resume with the checkpoint's "
                                         "ranks and workers")
            readers.append(state)
    return readers


def plan_resplit(ranks: list[dict], world: int, num_workers: int) -> ElasticPlan:
    """Deal the saved readers' unread pieces and in-flight samples over world × num_workers new
    readers (reader r·W + w), in the order of (shard, sample started at, offset)."""
    readers = saved_readers(ranks)
    new = world * max(1, num_workers)
    plan = ElasticPlan(old_readers=len(readers), new_readers=new, epoch=max(int(s["epoch"]) for s in readers))
    remainders = [reader_remainder(state) for state in readers]
    num_sources = len(remainders[0][0])
    plan.pieces = {reader: [[] for _ in range(num_sources)] for reader in range(new)}
    for source in range(num_sources):
        pieces = sorted((piece for sources, _ in remainders for piece in sources[source]),
                        key=lambda p: (p["order"][0], p["position"][1], p["offset"], p["position"][2]))
        for number, piece in enumerate(pieces):
            plan.pieces[(number + source) % new][source].append(piece)
    inflight = sorted(ref for _, refs in remainders for ref in refs)
    plan.pool = {reader: inflight[reader::new] for reader in range(new)}
    plan.requeued = len(inflight)
    return plan


def start_states(plan: ElasticPlan, kind: str, rank: int, num_workers: int, batches: int) -> dict[int, dict]:
    """Where each worker of `rank` starts: its pieces and in-flight samples. Worker w of W has
    yielded the batches before `batches` that fall to it (the DataLoader takes workers in turn,
    starting with the one whose batch is next), so the resolution and dropping schedules go on
    from the checkpoint's step."""
    workers = max(1, num_workers)
    shift = batches % workers
    return {worker: {"kind": kind, "elastic": True, "worker": worker, "num_workers": workers, "epoch": plan.epoch,
                     "yielded": batches // workers + (worker < shift),
                     "pieces": plan.pieces[rank * workers + worker],
                     "pool": [list(ref) for ref in plan.pool[rank * workers + worker]]}
            for worker in range(workers)}


def rank_stream_state(data: dict, rank: int, world: int, num_workers: int, resampled: bool,
                      ) -> tuple[dict, dict | None]:
    """(the stream state `rank` resumes from, the elastic report or None) from a checkpoint's data
    state: {"batches", "ranks": [each rank's {worker: position}], "stream": identity}. The same
    layout resumes every worker at its own position; another one re-splits the epoch's rest."""
    ranks, saved = data.get("ranks"), data.get("stream") or {}
    old_world = int(saved.get("world_size", len(ranks) if ranks else world))
    old_workers = max(1, int(saved.get("num_workers", num_workers)))
    if (old_world, old_workers) == (world, max(1, num_workers)):
        return ({"batches": data["batches"], "workers": ranks[rank]} if ranks is not None else data), None
    layout = {"from": f"{old_world}x{old_workers}", "to": f"{world}x{max(1, num_workers)}"}
    if resampled:  # shards drawn with replacement: no epoch to finish, the new readers draw afresh
        return {"batches": data["batches"], "restart": True}, {**layout, "resampled": True}
    if ranks is None:
        raise ElasticResumeError("cannot resume on a different number of ranks or workers: the checkpoint keeps "
                                 f"only rank 0's stream position (written by an earlier version); resume on "
                                 f"{old_world} ranks with data.num_workers={old_workers}")
    plan = plan_resplit(ranks, world, num_workers)
    kind = saved_readers(ranks)[0]["kind"]
    states = start_states(plan, kind, rank, num_workers, int(data["batches"]))
    return {"batches": data["batches"], "workers": {str(w): s for w, s in states.items()}}, {**layout, **plan.report()}
