"""Each shard's recorded sample count (sizes.json), and a shard cut between two samples: its
missing tail is counted as skipped ("truncated_shard") instead of ending silently."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from navit_clip.cli import main
from navit_clip.data.loader import PackedStream
from navit_clip.data.shard_files import SIZES_FILE, recorded_counts, write_shards
from navit_clip.data.shards import SKIP_REASONS, ReadStats, ShardSplit, read_samples, skip_counts

from conftest import stream_from_config

PER_SHARD = 5


def png(width: int, height: int, seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (seed * 37 % 256, 90, 160)).save(buffer, format="PNG")
    return buffer.getvalue()


def samples(prefix: str, count: int) -> list[dict]:
    return [{"__key__": f"{prefix}{i:03d}", "png": png(20 + i, 16 + 2 * i, i), "txt": f"picture {i}"}
            for i in range(count)]


def members_per_sample(path: str) -> Counter:
    with tarfile.open(path) as tar:
        return Counter(m.name.split(".", 1)[0] for m in tar.getmembers())


def cut_before_sample(path: str, index: int, out: Path) -> None:
    """A copy of the shard that ends right before sample `index` (between two samples: a valid
    tar prefix, no error when read)."""
    with tarfile.open(path) as tar:
        keys = list(dict.fromkeys(m.name.split(".", 1)[0] for m in tar.getmembers()))
        first = next(m for m in tar.getmembers() if m.name.startswith(keys[index] + "."))
    out.write_bytes(Path(path).read_bytes()[:first.offset])


def test_write_shards_records_each_shards_count(tmp_path):
    paths = write_shards(samples("a", 12), str(tmp_path / "a-%06d.tar"), max_per_shard=PER_SHARD)
    write_shards(samples("b", 3), str(tmp_path / "b-%06d.tar"), max_per_shard=PER_SHARD)
    recorded = json.loads((tmp_path / SIZES_FILE).read_text())
    # independent count: the distinct sample keys in each tar
    assert recorded == {p.name: len(members_per_sample(str(p))) for p in tmp_path.glob("*.tar")}
    assert [recorded[Path(p).name] for p in paths] == [5, 5, 2]
    assert recorded["b-000000.tar"] == 3  # a second writer in the same folder keeps the first one's counts


@pytest.fixture()
def cut_set(tmp_path) -> tuple[list[str], list[str]]:
    """Two shards of 5 samples; the first cut after its third sample, so 2 samples are missing."""
    data = samples("s", 2 * PER_SHARD)
    paths = write_shards(data, str(tmp_path / "s-%06d.tar"), max_per_shard=PER_SHARD)
    whole = tmp_path / "whole.tar"
    whole.write_bytes(Path(paths[0]).read_bytes())
    cut_before_sample(str(whole), 3, Path(paths[0]))
    kept = [d["__key__"] for d in data[:3] + data[PER_SHARD:]]
    return paths, kept


def test_missing_tail_counted_as_skipped(cut_set):
    paths, kept = cut_set
    stats = ReadStats()
    keys = [s.key for s in read_samples(ShardSplit(tuple(paths)), stats)]
    assert keys == kept
    assert dict(stats.skipped) == {"truncated_shard": 2}
    assert skip_counts(stats.skipped)[SKIP_REASONS.index("truncated_shard")] == 2


@pytest.mark.parametrize("stride", [2, 3])
def test_missing_tail_counted_once_over_readers_that_stride(cut_set, stride):
    paths, kept = cut_set
    keys, missing = [], 0
    for offset in range(stride):
        stats = ReadStats()
        keys += [s.key for s in read_samples(ShardSplit(tuple(paths), stride, offset), stats)]
        missing += stats.skipped["truncated_shard"]
    assert sorted(keys) == sorted(kept) and missing == 2


def test_missing_tail_reaches_the_training_batches(cut_set, tmp_path):
    paths, kept = cut_set
    spec = stream_from_config(str(Path(paths[0]).parent / "s-{000000..000001}.tar"),
                              ["model.vision.patch_size=8", "data.seq_len=64", "data.max_images=6",
                               "data.sequences_per_batch=2", "data.resolution.max_tokens=16",
                               "data.shuffle_buffer=0"], loop=False)
    skipped: Counter = Counter()
    for batch in PackedStream(spec):
        skipped.update(batch.skipped_by_reason)
    assert skipped == {"truncated_shard": 2}


def test_no_record_no_count(cut_set):
    paths, _ = cut_set
    (Path(paths[0]).parent / SIZES_FILE).unlink()
    stats = ReadStats()
    list(read_samples(ShardSplit(tuple(paths)), stats))
    assert stats.num_skipped == 0 and recorded_counts(Path(paths[0]).parent) == {}


def test_pack_shards_records_counts(tiny_shards, tmp_path):
    out = tmp_path / "packed"
    assert main(["pack-shards", "--shards", tiny_shards.spec, "--out", str(out), "--per-shard", "2",
                 "model.vision.patch_size=16", "model.vision.max_grid_side=8", "data.seq_len=64",
                 "data.max_images=5", "data.sequences_per_batch=2", "data.resolution.max_tokens=24",
                 "data.resolution.min_tokens=4", "data.shuffle_buffer=0"]) == 0
    recorded = recorded_counts(out)
    tars = sorted(out.glob("*.tar"))
    assert len(tars) >= 2
    assert recorded == {p.name: len(members_per_sample(str(p))) for p in tars}
    spec = stream_from_config(str(out) + "/", ["model.vision.patch_size=16", "model.vision.max_grid_side=8",
                                               "data.seq_len=64", "data.max_images=5", "data.sequences_per_batch=2",
                                               "data.shuffle_buffer=0"], loop=False)
    batches = list(PackedStream(spec))  # read back whole: nothing counted as missing
    assert batches and not any(b.skipped_by_reason for b in batches)


def test_written_shards_have_one_plain_header_per_member(tmp_path):
    """A fractional time stamp would give every member an extended (PAX) header, twice the
    headers for each reader to parse."""
    (path,) = write_shards(samples("a", 3), str(tmp_path / "a-%06d.tar"), max_per_shard=PER_SHARD)
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    assert len(members) == 6  # the png and txt of each of the 3 samples
    assert all(m.pax_headers == {} and m.mtime == int(m.mtime) for m in members)
    # a tar block is 512 bytes: a plain header and the padded data, nothing else
    assert Path(path).stat().st_size <= sum(512 + -(-m.size // 512) * 512 for m in members) + 10240
