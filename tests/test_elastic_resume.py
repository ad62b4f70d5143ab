"""Elastic resume of the data stream: the unread rest of an epoch, re-split over a different number
of (rank, worker) readers, is read exactly once, and what was read before the checkpoint never.

The re-split is checked against a plain set computation over (shard, sample) pairs, and real
streams resumed on other layouts are checked against the sample keys of the uninterrupted epoch.
"""

from __future__ import annotations

import itertools
import json
import random

import pytest

from navit_clip.data.elastic import ElasticResumeError, packer_refs, plan_resplit, rank_stream_state
from navit_clip.data.loader import ResumableBatches, make_loader
from navit_clip.data.prepacked import write_packed_shards

from conftest import stream_from_config
from test_loader import BASE

EMPTY_PACKER = {"buffer": [], "open": [], "closed": []}
SIZES = {0: 5, 1: 7, 2: 3, 3: 6, 4: 4, 5: 8, 6: 2}  # samples per shard


def expand(piece: dict) -> list[tuple[int, int]]:
    """The samples a piece reads: from its position on, every `stride`-th of its split's samples."""
    place, skip, index = piece["position"]
    taken = []
    for number, shard in enumerate(piece["order"][place:]):
        for member in range(skip if number == 0 else 0, SIZES[shard]):
            if index % piece["stride"] == piece["offset"]:
                taken.append((shard, member))
            index += 1
    return taken


def raw_state(order: list[int], stride: int, offset: int, position: list[int], inflight: list) -> dict:
    """A saved raw reader: one source; the in-flight samples split between pool and packer."""
    pool, held = inflight[: len(inflight) // 2], inflight[len(inflight) // 2:]
    packer = {"buffer": [{"shard": s, "member": m} for s, m in held[:1]],
              "open": [[{"shard": s, "member": m} for s, m in held[1:]]], "closed": []}
    return {"kind": "raw", "epoch": 0, "orders": [order], "splits": [[stride, offset]],
            "items": {"readers": [position], "pool": [list(r) for r in pool]}, "packer": packer}


def saved_layout(readers: int, rng: random.Random, strided: bool) -> tuple[list[dict], set]:
    """Old readers at random positions -> (their states, the samples they have read)."""
    shards = list(SIZES)
    states, read = [], set()
    order = shards[:]
    rng.shuffle(order)
    for reader in range(readers):
        mine = order if strided else order[reader::readers]
        stride, offset = (readers, reader) if strided else (1, 0)
        split = [(s, m) for s in mine for m in range(SIZES[s])]
        done = rng.randint(0, len(split))
        passed = split[:done]
        gone = [ref for index, ref in enumerate(passed) if index % stride == offset]
        place = next((n for n, s in enumerate(mine) if (s, 0) not in passed or (s, SIZES[s] - 1) not in passed),
                     len(mine) - 1)
        skip = sum(1 for s, _ in passed if s == mine[place])
        inflight = rng.sample(gone, min(len(gone), rng.randint(0, 4)))
        states.append(raw_state(mine, stride, offset, [place, skip, done], inflight))
        read |= set(gone) - set(inflight)
    return states, read


@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("old,new", [(3, 1), (3, 2), (2, 5), (1, 4), (3, 3)])
@pytest.mark.parametrize("seed", range(4))
def test_every_unread_sample_goes_to_exactly_one_new_reader(old, new, strided, seed):
    if strided and old > len(SIZES):
        pytest.skip("strided readers need fewer shards than readers")
    states, read = saved_layout(old, random.Random(seed), strided)
    everything = {(s, m) for s, size in SIZES.items() for m in range(size)}
    plan = plan_resplit([{"0": state} for state in states], world=new, num_workers=1)
    assigned = []
    for reader in range(new):
        assigned += [ref for piece in plan.pieces[reader][0] for ref in expand(piece)] + plan.pool[reader]
    assert len(assigned) == len(set(assigned)), "a sample went to two new readers"
    assert set(assigned) == everything - read
    requeued = sum(len(s["items"]["pool"]) + len(s["packer"]["buffer"]) + len(s["packer"]["open"][0]) for s in states)
    assert plan.report()["samples_requeued"] == requeued


def test_a_checkpoint_without_every_position_is_refused():
    with pytest.raises(ElasticResumeError, match="rank 0's stream position"):
        rank_stream_state({"batches": 3, "workers": {}, "stream": {"world_size": 2, "num_workers": 0}}, 0, 1, 0, False)


# --------------------------------------------------------------------------- real streams


def spec(shards: str):
    return stream_from_config(shards, [*BASE, "data.packing.buffer_size=4"], loop=False, shuffle_buffer=3)


@pytest.fixture(scope="module")
def packed_shards(tiny_shards, tmp_path_factory) -> str:
    """The tiny samples pre-packed, one sequence per sample of a shard, 2 sequences a shard."""
    directory = tmp_path_factory.mktemp("packed")
    loader = make_loader(stream_from_config(tiny_shards.spec, BASE, loop=False, shuffle_buffer=0))
    return ",".join(write_packed_shards(loader, str(directory / "p-%03d.tar"), sequences_per_shard=2))


def keys(batch) -> list[str]:
    return [k for seq in batch.keys for k in seq]


def run_layout(spec, data: dict | None, world: int, workers: int, take: int | None) -> tuple[list[str], dict, list]:
    """Every rank of a layout reads `take` batches (None: to the end of the epoch), resumed from
    `data` -> (keys read, the checkpoint's data state after them, the elastic reports)."""
    read, ranks, reports = [], [], []
    for rank in range(world):
        state, report = rank_stream_state(data, rank, world, workers, False) if data else (None, None)
        reports.append(report)
        batches = ResumableBatches(make_loader(spec, rank=rank, world=world, num_workers=workers), state=state)
        try:
            for batch in itertools.islice(batches, take):
                read += keys(batch)
            saved = json.loads(json.dumps(batches.state_dict()))
        finally:
            batches.close()
        ranks.append(saved["workers"])
    data = {"batches": saved["batches"], "ranks": ranks, "stream": {"world_size": world, "num_workers": workers}}
    return read, data, reports


@pytest.mark.parametrize("layouts", [
    [(2, 0, 1), (1, 0, None)],
    [(2, 0, 1), (1, 2, None)],
    [(1, 0, 1), (2, 0, None)],
    [(1, 2, 2), (3, 1, None)],
    [(2, 0, 1), (1, 0, 1), (2, 1, None)],  # resumed again in the middle of an elastic pass
])
def test_resumed_on_another_layout_the_epoch_is_read_exactly_once(tiny_shards, layouts):
    check_layouts(spec(tiny_shards.spec), layouts)


@pytest.mark.parametrize("layouts", [[(2, 0, 1), (1, 2, None)], [(1, 0, 2), (3, 0, 1), (2, 0, None)]])
def test_prepacked_stream_resumed_on_another_layout(packed_shards, layouts):
    check_layouts(spec(packed_shards), layouts)


def in_flight(state: dict) -> int:
    """Samples a saved reader held in its shuffle pool and packer (or was dealt and had not started on)."""
    if state.get("elastic"):
        return len(state["pool"])
    return len(state["items"]["pool"]) + sum(1 for _ in packer_refs(state.get("packer", EMPTY_PACKER)))


def check_layouts(stream, layouts: list[tuple[int, int, int | None]]) -> None:
    """Read one epoch through `layouts` ((ranks, workers, batches each rank reads or None for the
    rest), each resumed from the previous one's checkpoint): every sample exactly once."""
    epoch, _, _ = run_layout(stream, None, 2, 0, None)  # the uninterrupted epoch's samples
    read, data, requeued = [], None, []
    for world, workers, take in layouts:
        inflight = 0 if data is None else sum(in_flight(s) for rank in data["ranks"] for s in rank.values())
        got, data, reports = run_layout(stream, data, world, workers, take)
        read += got
        if reports[0] is not None:
            assert all(r == reports[0] for r in reports), "ranks disagree on the re-split"
            assert reports[0]["samples_requeued"] == inflight
            assert reports[0]["samples_replayed"] == reports[0]["samples_skipped"] == 0
            requeued.append(inflight)
    assert sorted(read) == sorted(epoch), "samples lost or read twice"
    assert len(read) == len(set(read)) == len(epoch)
    assert any(requeued), "the cuts should fall where buffers hold samples"


def test_only_a_partitioned_optimizer_on_another_world_size_needs_the_universal_checkpoint(tmp_path):
    """ZeRO >= 1 keeps one optimizer partition per rank: this 1-rank process must re-slice a 2-rank
    checkpoint's; ZeRO 0 (replicated), a 1-rank checkpoint, or one without manifests load as saved."""
    from navit_clip.train.manifest import write_manifest
    from navit_clip.train.universal import needs_universal

    two, one, old = tmp_path / "step3", tmp_path / "step4", tmp_path / "step5"
    for tag_dir, world in ((two, 2), (one, 1)):
        tag_dir.mkdir()
        write_manifest(tag_dir, 0, world, 3, [])
    old.mkdir()
    assert [needs_universal(two, stage) for stage in (0, 1, 2, 3)] == [False, True, True, True]
    assert not needs_universal(one, 1) and not needs_universal(old, 1)


def test_a_failed_conversion_is_an_error_naming_the_checkpoint(tmp_path):
    """A 2-rank ZeRO-1 checkpoint without its DeepSpeed files cannot be converted: the resume stops
    with one CheckpointError that names the step and the world size to resume on instead."""
    from navit_clip.errors import CheckpointError
    from navit_clip.train.manifest import write_manifest
    from navit_clip.train.universal import resume_through_universal

    (tmp_path / "step3").mkdir()
    write_manifest(tmp_path / "step3", 0, 2, 3, [])
    assert resume_through_universal(tmp_path, -1, 1) is False  # a fresh run converts nothing
    with pytest.raises(CheckpointError, match="cannot resume step3 on 1 ranks: converting it .* resume on 2 ranks"):
        resume_through_universal(tmp_path, 3, 1)
    assert not (tmp_path / "step3" / "universal").exists()


def test_conversion_and_universal_loads_never_unpickle_arbitrary_objects(tmp_path):
    """DeepSpeed's converter asks torch.load for weights_only=False; inside weights_only_loads it
    gets weights_only=True: tensors and DeepSpeed's plain-data classes load, other objects do not."""
    import pickle

    import torch
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from navit_clip.train.universal import weights_only_loads

    plain, hostile = tmp_path / "plain.pt", tmp_path / "hostile.pt"
    torch.save({"w": torch.ones(2), "stage": ZeroStageEnum.optimizer_states}, plain)
    torch.save({"f": _Hostile()}, hostile)
    with weights_only_loads():
        assert torch.load(plain, weights_only=False)["stage"] == ZeroStageEnum.optimizer_states
        with pytest.raises(pickle.UnpicklingError):
            torch.load(hostile, weights_only=False)
    assert isinstance(torch.load(hostile, weights_only=False)["f"], _Hostile)  # restored afterwards


class _Hostile:
    """An object a shard or checkpoint must never get to rebuild."""
