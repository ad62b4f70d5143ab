"""Shard listing and splitting, safe decoding, counting (not crashing on) bad samples."""

from __future__ import annotations

import io
import os
import pickle
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from navit_clip.data.shards import (
    ReadStats,
    Sample,
    ShardError,
    ShardSplit,
    expand_shards,
    read_samples,
    split_shards,
)

from conftest import TINY_SHARD_SIZES, write_tar


def png(width: int, height: int, seed: int = 0, mode: str = "RGB") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, format="PNG")
    return buffer.getvalue()



def forged_png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels but carries almost no data."""
    data = bytearray(png(4, 4))
    ihdr = 8 + 8  # signature, then length + b"IHDR"
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[12:ihdr + 13]))  # type + 13 bytes of IHDR data
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


class _CreatesFile:
    """Unpickling this object creates (opens for writing) a file: proof that something was unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


# ------------------------------------------------------------------------------- expand_shards


@pytest.fixture()
def shard_dir(tmp_path):
    for i in range(4):
        write_tar(tmp_path / f"shard-{i:06d}.tar", [(f"k{i}.txt", b"x")])
    (tmp_path / "notes.txt").write_text("not a shard")
    return tmp_path


def test_expand_brace(shard_dir):
    paths = expand_shards(f"{shard_dir}/shard-{{000000..000003}}.tar")
    assert paths == [f"{shard_dir}/shard-{i:06d}.tar" for i in range(4)]
    assert expand_shards(f"{shard_dir}/shard-{{000001..000002}}.tar") == [
        f"{shard_dir}/shard-000001.tar", f"{shard_dir}/shard-000002.tar"]


def test_expand_glob_sorted(shard_dir):
    assert expand_shards(f"{shard_dir}/shard-*.tar") == [f"{shard_dir}/shard-{i:06d}.tar" for i in range(4)]
    assert expand_shards(f"{shard_dir}/shard-00000[13].tar") == [
        f"{shard_dir}/shard-000001.tar", f"{shard_dir}/shard-000003.tar"]


@pytest.mark.parametrize("suffix", ["", "/"])
def test_expand_directory(shard_dir, suffix):
    paths = expand_shards(f"{shard_dir}{suffix}")
    assert [os.path.basename(p) for p in paths] == [f"shard-{i:06d}.tar" for i in range(4)]
    assert all(os.path.exists(p) for p in paths)


def test_expand_comma_list_keeps_order(shard_dir):
    spec = f"{shard_dir}/shard-000003.tar, {shard_dir}/shard-000000.tar,{shard_dir}/shard-00000[12].tar"
    assert expand_shards(spec) == [f"{shard_dir}/shard-{i:06d}.tar" for i in (3, 0, 1, 2)]


def test_expand_missing_file_names_it(shard_dir):
    with pytest.raises(ShardError, match="shard-000009.tar"):
        expand_shards(f"{shard_dir}/shard-000000.tar,{shard_dir}/shard-000009.tar")
    with pytest.raises(ShardError, match="shard-000004.tar"):
        expand_shards(f"{shard_dir}/shard-{{000000..000004}}.tar")


@pytest.mark.parametrize("spec", ["{d}/nothing-*.tar", "{d}/empty_dir", "", " , "])
def test_expand_no_match(shard_dir, spec):
    (shard_dir / "empty_dir").mkdir()
    with pytest.raises(ShardError, match="matches no shard"):
        expand_shards(spec.format(d=shard_dir))


def test_expand_shard_error_is_value_error():
    assert issubclass(ShardError, ValueError)


def test_expand_brace_alternatives(shard_dir):
    assert expand_shards(f"{shard_dir}/shard-{{000000,000002}}.tar") == [
        f"{shard_dir}/shard-000000.tar", f"{shard_dir}/shard-000002.tar"]


# -------------------------------------------------------------------------------- split_shards


@pytest.mark.parametrize("n_shards, world, workers", [(8, 2, 2), (4, 2, 2), (9, 2, 2), (7, 3, 1), (16, 1, 4),
                                                      (1, 1, 1), (5, 1, 1), (12, 4, 3)])
def test_split_disjoint_and_covering(n_shards, world, workers):
    shards = [f"s{i:03d}.tar" for i in range(n_shards)]
    seen: list[str] = []
    sizes = []
    for rank in range(world):
        for worker in range(workers):
            split = split_shards(shards, rank, world, worker, workers)
            assert split.stride == 1 and split.offset == 0
            assert len(split.shards) >= 1
            seen += split.shards
            sizes.append(len(split.shards))
    assert sorted(seen) == shards and len(seen) == len(set(seen))
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("n_shards, world, workers", [(3, 2, 2), (1, 2, 1), (2, 4, 2), (5, 3, 2)])
def test_split_stride_mode_when_fewer_shards(n_shards, world, workers):
    shards = [f"s{i:03d}.tar" for i in range(n_shards)]
    readers = world * workers
    offsets = []
    for rank in range(world):
        for worker in range(workers):
            split = split_shards(shards, rank, world, worker, workers)
            assert split.shards == tuple(shards)
            assert split.stride == readers
            offsets.append(split.offset)
    assert sorted(offsets) == list(range(readers))
    # every sample index is kept by exactly one reader
    kept = [i for off in offsets for i in range(100) if i % readers == off]
    assert sorted(kept) == list(range(100))


def test_stride_mode_reads_each_sample_once(tiny_shards):
    shards = list(tiny_shards.paths)  # 5 shards, 6 readers -> stride mode
    world, workers = 3, 2
    keys: list[str] = []
    for rank in range(world):
        for worker in range(workers):
            split = split_shards(shards, rank, world, worker, workers)
            assert split.stride == 6
            stats = ReadStats()
            keys += [s.key for s in read_samples(split, stats)]
    assert sorted(keys) == sorted(tiny_shards.keys)


def test_disjoint_mode_reads_each_sample_once(tiny_shards):
    shards = list(tiny_shards.paths)
    keys: list[str] = []
    for rank in range(2):
        split = split_shards(shards, rank, 2, 0, 1)
        keys += [s.key for s in read_samples(split, ReadStats())]
    assert sorted(keys) == sorted(tiny_shards.keys)


# -------------------------------------------------------------------------------- read_samples


def test_read_tiny_shards_decodes_everything(tiny_shards):
    stats = ReadStats()
    samples = list(read_samples(ShardSplit(tiny_shards.paths), stats))
    assert [s.key for s in samples] == list(tiny_shards.keys)
    assert stats.decoded == tiny_shards.count and stats.num_skipped == 0
    for s in samples:
        assert isinstance(s, Sample)
        # a greyscale file stays one channel until it is resized; every other mode becomes RGB
        assert s.image.mode == ("L" if dict(zip(tiny_shards.keys, TINY_SHARD_SIZES))[s.key][2] == "L" else "RGB")
        assert s.image.size == tiny_shards.sizes[s.key]
        assert s.caption == tiny_shards.captions[s.key]
        assert s.meta == {"label": tiny_shards.labels[s.key]}


@pytest.fixture()
def corrupt_shard(tmp_path):
    """One shard of good samples interleaved with every kind of broken one."""
    good = png(20, 12, seed=1)
    truncated = png(40, 40, seed=2)
    marker = tmp_path / "UNPICKLED_MARKER"
    evil = pickle.dumps(_CreatesFile(str(marker)))
    members = [
        ("good0.png", good), ("good0.txt", b"a good caption"), ("good0.json", b'{"label": 3}'),
        ("truncpng.png", truncated[: len(truncated) // 2]), ("truncpng.txt", b"truncated image"),
        ("garbage.png", os.urandom(300)), ("garbage.txt", b"garbage image"),
        ("nonutf8.png", good), ("nonutf8.txt", b"caf\xe9 \xff\xfe"),
        ("nocaption.png", good), ("nocaption.json", b'{"label": 1}'),
        ("good1.png", png(9, 30, seed=3)), ("good1.txt", "unicode caption: café ✓".encode()),
        ("badjson.png", good), ("badjson.txt", b"bad json"), ("badjson.json", b"{label: 1,"),
        ("listjson.png", good), ("listjson.txt", b"json list"), ("listjson.json", b"[1, 2]"),
        ("emptycap.png", good), ("emptycap.txt", b"   \n"),
        ("noimage.txt", b"a caption without image"), ("noimage.json", b"{}"),
        ("pickled.png", good), ("pickled.txt", b"has a pickle"), ("pickled.pyd", evil),
        ("pickled2.png", good), ("pickled2.txt", b"has a pickle too"), ("pickled2.pickle", evil),
        ("pickimg.png", evil), ("pickimg.txt", b"image is a pickle"),
        ("pickjson.png", good), ("pickjson.txt", b"json is a pickle"), ("pickjson.json", evil),
        ("good2.png", png(64, 16, seed=4, mode="L")), ("good2.txt", b"last good one"),
    ]
    path = write_tar(tmp_path / "corrupt-000000.tar", members)
    return path, marker, evil


CORRUPT_SKIPS = {"undecodable_image": 3, "caption_not_utf8": 1, "no_caption": 1, "bad_json": 3,
                 "empty_caption": 1, "no_image": 1}
CORRUPT_GOOD = ["good0", "good1", "pickled", "pickled2", "good2"]


def test_read_samples_skips_and_counts_corrupt(corrupt_shard, tiny_shards):
    path, marker, _ = corrupt_shard
    stats = ReadStats()
    # the corrupt shard between two good ones: reading carries on past it
    shards = (tiny_shards.paths[0], path, tiny_shards.paths[1])
    samples = list(read_samples(ShardSplit(shards), stats))
    keys = [s.key for s in samples]
    assert keys == list(tiny_shards.keys[:5]) + CORRUPT_GOOD + list(tiny_shards.keys[5:10])
    assert dict(stats.skipped) == CORRUPT_SKIPS
    assert stats.num_skipped == sum(CORRUPT_SKIPS.values())
    assert stats.decoded == len(keys)
    by_key = {s.key: s for s in samples}
    assert by_key["good0"].meta == {"label": 3} and by_key["good0"].caption == "a good caption"
    assert by_key["good1"].caption == "unicode caption: café ✓" and by_key["good1"].meta == {}
    assert by_key["good2"].image.mode == "L" and by_key["good2"].image.size == (64, 16)
    assert not marker.exists()


def test_pickles_are_never_unpickled(corrupt_shard, tmp_path):
    path, marker, evil = corrupt_shard
    # the payload is live: unpickling it really does create a file
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_CreatesFile(str(probe)))).close()
    assert probe.exists()
    stats = ReadStats()
    samples = {s.key: s for s in read_samples(ShardSplit((path,)), stats)}
    assert not marker.exists(), "a pickle from the shard was unpickled"
    for key in ("pickled", "pickled2"):
        sample = samples[key]
        assert set(vars(sample)) == {"key", "image", "caption", "meta", "native_size"}
        assert sample.native_size is None
        assert sample.meta == {}
        assert "pyd" not in sample.meta and "pickle" not in sample.meta
        assert all(not isinstance(v, _CreatesFile) for v in vars(sample).values())
    assert "pickimg" not in samples and "pickjson" not in samples


def test_max_pixels_guard(tmp_path):
    path = write_tar(tmp_path / "sizes.tar", [
        ("small.png", png(20, 20)), ("small.txt", b"small"),
        ("exact.png", png(25, 40)), ("exact.txt", b"exactly at the limit"),
        ("big.png", png(50, 50)), ("big.txt", b"big"),
    ])
    stats = ReadStats()
    keys = [s.key for s in read_samples(ShardSplit((path,)), stats, max_pixels=1000)]
    assert keys == ["small", "exact"]
    assert dict(stats.skipped) == {"image_too_large": 1}
    stats = ReadStats()
    assert len(list(read_samples(ShardSplit((path,)), stats, max_pixels=10_000))) == 3


def test_max_pixels_checked_before_decoding(tmp_path):
    """A header claiming 9000x8000 pixels is rejected as too large without decoding its data."""
    path = write_tar(tmp_path / "bomb.tar", [("bomb.png", forged_png_header(9000, 8000)), ("bomb.txt", b"bomb"),
                                             ("fine.png", png(8, 8)), ("fine.txt", b"fine")])
    stats = ReadStats()
    keys = [s.key for s in read_samples(ShardSplit((path,)), stats, max_pixels=64_000_000)]
    assert keys == ["fine"]
    assert dict(stats.skipped) == {"image_too_large": 1}


def test_stride_and_offset_select_samples(tiny_shards):
    split = ShardSplit(tiny_shards.paths, stride=4, offset=1)
    stats = ReadStats()
    keys = [s.key for s in read_samples(split, stats)]
    assert keys == list(tiny_shards.keys[1::4])
    assert stats.decoded == len(keys)


def test_missing_shard_file_is_counted_not_fatal(tiny_shards, tmp_path):
    stats = ReadStats()
    keys = [s.key for s in read_samples(ShardSplit((str(tmp_path / "gone.tar"), tiny_shards.paths[0])), stats)]
    assert keys == list(tiny_shards.keys[:5])
    assert stats.skipped["unreadable_tar_member"] >= 1


def test_truncated_tar_keeps_earlier_samples_and_counts(tiny_shards, tmp_path):
    """A shard cut off inside a member (interrupted copy): the samples before it are read, the loss is
    counted, and the next shard is still read."""
    with tarfile.open(tiny_shards.paths[0]) as tar:
        member = next(m for m in tar.getmembers() if m.name == f"{tiny_shards.keys[2]}.png")
    data = Path(tiny_shards.paths[0]).read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: member.offset_data + member.size // 2])
    stats = ReadStats()
    keys = [s.key for s in read_samples(ShardSplit((str(cut), tiny_shards.paths[1])), stats)]
    assert keys == list(tiny_shards.keys[:2]) + list(tiny_shards.keys[5:10])
    assert stats.num_skipped >= 1
