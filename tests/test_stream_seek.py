"""Resume by seeking: a stream restarted from the reader positions saved after batch k yields
exactly the batches the uninterrupted stream yields from k on, without replaying the first k."""

from __future__ import annotations

import itertools
import json

import pytest

from navit_clip.data.loader import ResumableBatches, make_loader
from navit_clip.data.packing import StreamingPacker
from navit_clip.data.prepacked import write_packed_shards

from conftest import stream_from_config
from test_loader import BASE, assert_same_batch

RAW_CASES = {
    "native": [],
    "sampled": ["data.resolution.mode=sampled"],
    "dropping": ["data.resolution.mode=sampled", "data.drop.rate=0.3"],
    "lookahead": ["data.packing.buffer_size=6"],
    "exact_fill": ["data.packing.buffer_size=6", "data.packing.exact_fill=true"],
}


def spec_for(shards: str, *overrides: str, shuffle_buffer: int = 5):
    return stream_from_config(shards, [*BASE, *overrides], loop=True, shuffle_buffer=shuffle_buffer)


def check_resume(spec, cut: int, take: int, num_workers: int, rank: int = 0, world: int = 1) -> dict:
    """The saved state after `cut` batches resumes to the uninterrupted stream's batches."""
    opened = []

    def batches(state=None) -> ResumableBatches:
        loader = make_loader(spec, rank=rank, world=world, num_workers=num_workers)
        opened.append(ResumableBatches(loader, state=state))
        return opened[-1]

    try:
        reference = list(itertools.islice(batches(), cut + take))
        saved = batches()
        list(itertools.islice(saved, cut))
        state = json.loads(json.dumps(saved.state_dict()))  # plain data: it survives JSON
        assert all(position is not None for position in state["workers"].values())
        resumed = batches(state)
        again = list(itertools.islice(resumed, take))
        for x, y in zip(reference[cut:], again, strict=True):
            assert_same_batch(x, y)
            assert x.skipped_by_reason == y.skipped_by_reason and x.truncated_captions == y.truncated_captions
        assert resumed.state_dict()["batches"] == cut + take
    finally:
        for stream in opened:
            stream.close()
    return state


@pytest.mark.parametrize("case", sorted(RAW_CASES))
@pytest.mark.parametrize("num_workers", [0, 1, 2])
def test_raw_stream_resumes_by_seeking(tiny_shards, case, num_workers):
    spec = spec_for(tiny_shards.spec, *RAW_CASES[case])
    state = check_resume(spec, cut=5, take=6, num_workers=num_workers)
    held = [p for p in state["workers"].values() if p["packer"]["buffer"] or p["packer"]["open"]
            or p["items"]["pool"]]
    assert held, "the cut should fall where buffers hold samples"


@pytest.mark.parametrize("cut", [1, 4, 9, 14])
def test_raw_stream_resumes_across_epochs(tiny_shards, cut):
    """Cuts before, at and after epoch boundaries (23 samples make about 4 batches an epoch)."""
    spec = spec_for(tiny_shards.spec, "data.resolution.mode=sampled", "data.packing.buffer_size=4")
    state = check_resume(spec, cut=cut, take=8, num_workers=0)
    assert state["workers"]["0"]["epoch"] >= (1 if cut >= 9 else 0)


@pytest.mark.parametrize("rank", [0, 1])
def test_two_sources_second_rank_resume(tiny_shards, rank):
    shards = f"{tiny_shards.paths[0]},{tiny_shards.paths[1]};{','.join(tiny_shards.paths[2:])}"
    spec = stream_from_config(shards, [*BASE, "data.sources.weights=0.6,0.4"], loop=True, shuffle_buffer=3)
    check_resume(spec, cut=3, take=4, num_workers=0, rank=rank, world=2)


def test_fewer_shards_than_readers_resume(tiny_shards):
    """5 shards for 2 ranks x 3 workers: every reader strides through all shards."""
    spec = spec_for(tiny_shards.spec, "data.packing.buffer_size=3", shuffle_buffer=2)
    state = check_resume(spec, cut=4, take=3, num_workers=3, rank=1, world=2)
    assert all(position["splits"][0][0] == 6 for position in state["workers"].values())


def test_changed_shards_are_named(tiny_shards, tmp_path):
    import shutil

    from navit_clip.data.shards import ShardError

    copies = [shutil.copy(path, tmp_path) for path in tiny_shards.paths]
    spec = spec_for(",".join(copies), "data.packing.buffer_size=6")
    saved = ResumableBatches(make_loader(spec))
    list(itertools.islice(saved, 2))
    state = saved.state_dict()
    held = state["workers"]["0"]["packer"]["buffer"][0]
    open(copies[held["shard"]], "wb").close()  # the shard is emptied after the checkpoint
    with pytest.raises(ShardError, match="shards changed since the checkpoint"):
        next(ResumableBatches(make_loader(spec), state=state))


@pytest.fixture(scope="module")
def packed_shards(tiny_shards, tmp_path_factory) -> str:
    spec = stream_from_config(tiny_shards.spec, BASE, loop=False, shuffle_buffer=0)
    directory = tmp_path_factory.mktemp("packed")
    paths = write_packed_shards(make_loader(spec), str(directory / "p-%03d.tar"), sequences_per_shard=3)
    return ",".join(paths)


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("cut", [2, 5])
def test_prepacked_stream_resumes_by_seeking(packed_shards, num_workers, cut):
    spec = spec_for(packed_shards, shuffle_buffer=3)
    check_resume(spec, cut=cut, take=5, num_workers=num_workers)


def test_resume_does_not_replay(tiny_shards, monkeypatch):
    """Seeking decodes only the samples the buffers held, not the batches before the cut."""
    spec = spec_for(tiny_shards.spec, "data.packing.buffer_size=4")
    saved = ResumableBatches(make_loader(spec))
    list(itertools.islice(saved, 12))
    state = saved.state_dict()
    pushed = []
    original = StreamingPacker._add
    monkeypatch.setattr(StreamingPacker, "_add", lambda self, image: (pushed.append(image), original(self, image)))
    resumed = ResumableBatches(make_loader(spec), state=state)
    next(resumed)
    assert len(pushed) < 12
