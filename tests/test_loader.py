"""PackedStream / make_loader / ResumableBatches on real (tiny) shards."""

from __future__ import annotations

import io
import itertools
import os
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from navit_clip.batch import PackedBatch
from navit_clip.data.loader import PackedStream, ResumableBatches, make_loader
from navit_clip.data.patches import patchify, unpatchify
from navit_clip.data.resolution import ResolutionPolicy
from navit_clip.data.shards import ReadStats, ShardSplit, read_samples
from navit_clip.data.spec import StreamSpec

from conftest import stream_from_config, write_tar

SOT, EOT = 49406, 49407  # open_clip BPE start / end of text


BASE = ["model.vision.patch_size=16", "model.vision.max_grid_side=8", "model.text.context_length=16",
        "data.seq_len=64", "data.max_images=5", "data.sequences_per_batch=2", "data.resolution.max_tokens=24",
        "data.resolution.min_tokens=4", "data.resolution.mode=native", "data.packing.open_sequences=3",
        "data.packing.buffer_size=0", "data.shuffle_buffer=0", "train.seed=0"]


def base_spec(shards: str, *overrides: str, **fields) -> StreamSpec:
    return stream_from_config(shards, [*BASE, *overrides], **{"loop": False, **fields})


def batch_keys(batches) -> list[str]:
    return [k for b in batches for seq in b.keys for k in seq]


def assert_same_batch(a: PackedBatch, b: PackedBatch) -> None:
    assert a.keys == b.keys
    for name in ("patches", "coords", "segment", "grid", "valid", "text"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def png(width: int, height: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()



@pytest.fixture(scope="module")
def loader_corrupt_shard(tmp_path_factory) -> str:
    """2 good samples and 4 bad ones (garbage image, non-UTF-8 caption, no caption, bad JSON)."""
    good = png(40, 24, 0)
    return write_tar(tmp_path_factory.mktemp("loader_corrupt") / "corrupt.tar", [
        ("cgood0.png", good), ("cgood0.txt", b"good zero"),
        ("cbad0.png", os.urandom(200)), ("cbad0.txt", b"garbage"),
        ("cbad1.png", good), ("cbad1.txt", b"\xff\xfe\xfd"),
        ("cbad2.png", good),
        ("cgood1.png", png(24, 40, 1)), ("cgood1.txt", b"good one"),
        ("cbad3.png", good), ("cbad3.txt", b"bad json"), ("cbad3.json", b"{oops"),
    ])


# ------------------------------------------------------------------------------ single stream


def test_stream_yields_valid_batches(tiny_shards):
    spec = base_spec(tiny_shards.spec)
    batches = list(PackedStream(spec))
    assert len(batches) >= 2
    decoded = {s.key: s for s in read_samples(ShardSplit(tiny_shards.paths), ReadStats())}
    policy = ResolutionPolicy(patch_size=16, max_tokens=24, max_side=8)
    for batch in batches:
        assert isinstance(batch, PackedBatch)
        batch.validate()
        assert batch.patches.shape == (2, 64, 16 * 16 * 3) and batch.patches.dtype == torch.uint8
        assert batch.valid.shape == (2, 5) and batch.text.shape == (2, 5, 16)
        assert batch.skipped_samples == 0
        for s, keys in enumerate(batch.keys):
            for slot, key in enumerate(keys):
                rows, cols = policy.grid_for(*tiny_shards.sizes[key])
                assert tuple(batch.grid[s, slot].tolist()) == (rows, cols)
                where = (batch.segment[s] == slot).nonzero().flatten()
                assert len(where) == rows * cols
                # the pixels are the decoded image made RGB, resized to its grid and cut into patches
                expected, coords = patchify(decoded[key].image.convert("RGB"), rows, cols, 16)
                got = batch.patches[s, where].numpy()
                np.testing.assert_array_equal(got, expected)
                np.testing.assert_array_equal(batch.coords[s, where].numpy(), coords)
                assert unpatchify(got, rows, cols, 16).shape == (rows * 16, cols * 16, 3)
                # the caption is tokenized: start token, ..., end token
                text = batch.text[s, slot].tolist()
                assert text[0] == SOT and EOT in text


@pytest.mark.parametrize("shuffle_buffer", [0, 6])
def test_single_pass_yields_every_sample_once(tiny_shards, shuffle_buffer):
    batches = list(PackedStream(base_spec(tiny_shards.spec, shuffle_buffer=shuffle_buffer)))
    keys = batch_keys(batches)
    assert sorted(keys) == sorted(tiny_shards.keys)
    assert len(keys) == len(set(keys))
    assert all(b.num_sequences == 2 for b in batches)


def test_loop_runs_past_one_epoch(tiny_shards):
    spec = base_spec(tiny_shards.spec, loop=True, shuffle_buffer=4)
    single = len(list(PackedStream(replace(spec, loop=False))))
    batches = list(itertools.islice(iter(PackedStream(spec)), 3 * single + 2))
    assert len(batches) == 3 * single + 2
    counts = Counter(batch_keys(batches))
    assert set(counts) == set(tiny_shards.keys)
    assert min(counts.values()) >= 2


def test_same_seed_same_batches(tiny_shards):
    spec = base_spec(tiny_shards.spec, "data.resolution.mode=sampled", loop=True, shuffle_buffer=8)
    a = list(itertools.islice(iter(PackedStream(spec)), 8))
    b = list(itertools.islice(iter(PackedStream(spec)), 8))
    for x, y in zip(a, b):
        assert_same_batch(x, y)
    c = list(itertools.islice(iter(PackedStream(replace(spec, seed=1))), 8))
    assert [x.keys for x in a] != [z.keys for z in c], "a different seed should change the stream"


def test_sampled_resolution_varies_sizes(tiny_shards):
    spec = base_spec(tiny_shards.spec, "data.resolution.mode=sampled", loop=True, shuffle_buffer=0)
    grids: dict[str, set] = {}
    for batch in itertools.islice(iter(PackedStream(spec)), 20):
        for s, keys in enumerate(batch.keys):
            for slot, key in enumerate(keys):
                rows, cols = batch.grid[s, slot].tolist()
                assert rows * cols <= spec.resolution.max_tokens
                grids.setdefault(key, set()).add((rows, cols))
    big = [k for k, (w, h) in tiny_shards.sizes.items() if w * h >= 150 * 150]
    assert any(len(grids[k]) > 1 for k in big)


@pytest.mark.parametrize("skip, take, num_workers", [(0, 4, 0), (3, 5, 0), (6, 3, 0), (3, 4, 2)])
def test_resumable_batches_replays_and_skips(tiny_shards, skip, take, num_workers):
    """A checkpoint with only a batch count (no reader positions) is resumed by replaying."""
    spec = base_spec(tiny_shards.spec, "data.resolution.mode=sampled", loop=True, shuffle_buffer=8)
    fresh = ResumableBatches(make_loader(spec, num_workers=num_workers))
    reference = list(itertools.islice(fresh, skip + take))
    assert fresh.state_dict()["batches"] == skip + take
    resumed = ResumableBatches(make_loader(spec, num_workers=num_workers), state={"batches": skip})
    assert resumed.state_dict()["batches"] == skip
    again = [next(resumed) for _ in range(take)]
    assert resumed.state_dict()["batches"] == skip + take
    for x, y in zip(reference[skip:], again):
        assert_same_batch(x, y)


# ---------------------------------------------------------------------- ranks and workers


def collect_keys(spec: StreamSpec, world: int, num_workers: int) -> dict[int, list[str]]:
    return {rank: batch_keys(make_loader(spec, rank=rank, world=world, num_workers=num_workers))
            for rank in range(world)}


def test_two_ranks_two_workers_disjoint_and_covering(tiny_shards):
    """5 shards, 2 ranks x 2 workers: each (rank, worker) reads its own shards, each sample once."""
    spec = base_spec(tiny_shards.spec, shuffle_buffer=4)
    keys = collect_keys(spec, world=2, num_workers=2)
    assert keys[0] and keys[1]
    assert not set(keys[0]) & set(keys[1])
    assert sorted(keys[0] + keys[1]) == sorted(tiny_shards.keys)


def test_fewer_shards_than_readers_without_shuffle(tiny_shards):
    """3 shards for 4 readers: stride mode, each sample read by exactly one (rank, worker)."""
    spec = base_spec(str(tiny_shards.directory / "tiny-{000000..000002}.tar"), shuffle_buffer=0)
    keys = collect_keys(spec, world=2, num_workers=2)
    assert not set(keys[0]) & set(keys[1])
    assert sorted(keys[0] + keys[1]) == sorted(tiny_shards.keys[:15])


def test_fewer_shards_than_readers_with_shuffle(tiny_shards):
    spec = base_spec(str(tiny_shards.directory / "tiny-{000000..000002}.tar"), shuffle_buffer=4)
    keys = collect_keys(spec, world=2, num_workers=2)
    assert sorted(keys[0] + keys[1]) == sorted(tiny_shards.keys[:15])


# --------------------------------------------------------------------------- skipped samples


@pytest.mark.parametrize("num_workers", [0, 2])
def test_skipped_samples_propagate(tiny_shards, loader_corrupt_shard, num_workers):
    spec = base_spec(f"{loader_corrupt_shard},{tiny_shards.spec}")
    batches = list(make_loader(spec, num_workers=num_workers))
    assert sum(b.skipped_samples for b in batches) == 4
    keys = batch_keys(batches)
    assert sorted(keys) == sorted(list(tiny_shards.keys) + ["cgood0", "cgood1"])
    if num_workers == 0:
        # one reader reads the corrupt shard first: its first batch reports all four skips
        assert [b.skipped_samples for b in batches] == [4] + [0] * (len(batches) - 1)


def test_skips_reported_once_per_epoch_when_looping(tiny_shards, loader_corrupt_shard):
    spec = base_spec(f"{loader_corrupt_shard},{tiny_shards.spec}", loop=True)
    per_epoch = len(list(PackedStream(replace(spec, loop=False))))
    batches = list(itertools.islice(iter(PackedStream(spec)), 3 * per_epoch))
    total = sum(b.skipped_samples for b in batches)
    # the corrupt shard is read first in every epoch: 4 skips per epoch begun, never more, never fewer
    counts = Counter(batch_keys(batches))
    assert total % 4 == 0
    assert 4 * max(counts.values()) <= total <= 4 * (min(counts.values()) + 2)
    assert total >= 12


def test_no_usable_sample_raises(tmp_path):
    path = write_tar(tmp_path / "allbad.tar", [("x.png", b"not a png"), ("x.txt", b"caption"),
                                               ("y.txt", b"no image")])
    with pytest.raises(RuntimeError, match="no usable sample"):
        list(PackedStream(base_spec(path)))


def test_missing_shard_fails_at_construction(tiny_shards):
    with pytest.raises(ValueError, match="tiny-000005.tar"):
        PackedStream(base_spec(str(tiny_shards.directory / "tiny-{000000..000099}.tar")))


def test_a_process_that_leaves_its_workers_running_still_exits(tiny_shards):
    """Workers ignore SIGTERM, which is how multiprocessing stops daemonic children at exit: a
    loader that is never closed (a test, a crash path) must not hang the interpreter's exit."""
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "from navit_clip.config import load_config\n"
        "from navit_clip.data.spec import stream_spec\n"
        "from navit_clip.data.loader import make_loader\n"
        f"cfg = load_config('configs/default.yaml', ['data.train_shards={tiny_shards.spec}'])\n"
        "it = iter(make_loader(stream_spec(cfg), rank=0, world=1, num_workers=2))\n"
        "next(it)\n"
        "print('leaving', flush=True)\n"
    )
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "leaving" in proc.stdout
    assert "Traceback" not in proc.stderr
