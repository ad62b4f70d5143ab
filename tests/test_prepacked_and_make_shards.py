"""pack-shards: batches read from pre-packed shards equal the online batches; nothing unpickled.
make-shards: image folder + caption file, img2dataset folders; bad inputs counted and skipped."""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from navit_clip.cli import main
from navit_clip.data.loader import PackedStream
from navit_clip.data.prepacked import write_packed_shards
from navit_clip.data.shards import ReadStats, ShardSplit, read_samples
from navit_clip.data.spec import StreamSpec

from conftest import stream_from_config, write_tar


BASE = ["model.vision.patch_size=16", "model.vision.max_grid_side=8", "model.text.context_length=16",
        "data.seq_len=64", "data.max_images=5", "data.sequences_per_batch=2", "data.resolution.max_tokens=24",
        "data.resolution.min_tokens=4", "data.packing.buffer_size=6", "data.shuffle_buffer=0"]


def spec_for(shards: str, *overrides: str, **fields) -> StreamSpec:
    return stream_from_config(shards, [*BASE, *overrides], **{"loop": False, **fields})


def assert_same(a, b) -> None:
    assert a.keys == b.keys
    for name in ("patches", "coords", "segment", "grid", "valid", "text"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_prepacked_batches_equal_online_batches(tiny_shards, tmp_path):
    spec = spec_for(tiny_shards.spec, "data.resolution.mode=sampled")
    online = list(PackedStream(spec))
    paths = write_packed_shards(PackedStream(spec), str(tmp_path / "packed-%06d.tar"), sequences_per_shard=3)
    assert len(paths) >= 2
    stream = PackedStream(replace(spec, shards=str(tmp_path) + "/"))
    assert stream.kind == "packed"  # chosen from what the shards contain
    packed = list(stream)
    assert len(packed) == len(online)
    for a, b in zip(online, packed):
        b.validate()
        assert_same(a, b)


def test_pack_shards_cli_and_training_stream_reads_them(tiny_shards, tmp_path):
    out = tmp_path / "packed"
    assert main(["pack-shards", "--shards", tiny_shards.spec, "--out", str(out), "--per-shard", "4", *BASE]) == 0
    spec = spec_for(str(out) + "/")
    keys = [k for batch in PackedStream(spec) for seq in batch.keys for k in seq]
    assert sorted(keys) == sorted(tiny_shards.keys)
    # split across 2 ranks x 2 workers, looping: every rank keeps yielding
    from navit_clip.data.loader import make_loader
    seen = []
    for rank in range(2):
        for batch in make_loader(spec, rank=rank, world=2, num_workers=2):
            seen += [k for seq in batch.keys for k in seq]
    assert sorted(seen) == sorted(tiny_shards.keys)


class _CreatesFile:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_prepacked_reader_never_unpickles(tiny_shards, tmp_path):
    spec = spec_for(tiny_shards.spec)
    write_packed_shards(PackedStream(spec), str(tmp_path / "packed-%06d.tar"), sequences_per_shard=100)
    marker = tmp_path / "UNPICKLED"
    evil = io.BytesIO()
    np.save(evil, np.array([_CreatesFile(str(marker))], dtype=object), allow_pickle=True)
    with tarfile.open(tmp_path / "packed-000000.tar") as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    first = members[0][0].split(".", 1)[0]
    members = [(n, evil.getvalue() if n == f"{first}.text.npy" else d) for n, d in members]
    members += [("junk.patches.npy", b"not npy"), ("junk.json", b"{}")]
    write_tar(tmp_path / "packed-000000.tar", members)
    batches = list(PackedStream(replace(spec, shards=str(tmp_path / "packed-000000.tar"))))
    assert not marker.exists()
    skipped = {}
    for b in batches:
        for r, n in b.skipped_by_reason.items():
            skipped[r] = skipped.get(r, 0) + n
    assert skipped == {"bad_text": 1, "bad_patches": 1}


def test_prepacked_patch_size_mismatch_names_shard(tiny_shards, tmp_path):
    write_packed_shards(PackedStream(spec_for(tiny_shards.spec)), str(tmp_path / "p-%06d.tar"), 100)
    from navit_clip.data.shards import ShardError
    with pytest.raises(ShardError, match="p-000000.tar"):
        list(PackedStream(spec_for(str(tmp_path / "p-000000.tar"), "model.vision.patch_size=8",
                                   "model.vision.max_grid_side=16")))


# --------------------------------------------------------------------------------- make-shards


def save(path: Path, width: int, height: int, fmt: str = "JPEG") -> bytes:
    pixels = np.random.default_rng(width * height).integers(0, 256, (height, width, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format=fmt)
    return path.read_bytes()


def shard_samples(spec: str) -> dict:
    from navit_clip.data.shards import expand_shards
    return {s.key: s for s in read_samples(ShardSplit(tuple(expand_shards(spec))), ReadStats())}


@pytest.mark.parametrize("kind", ["csv", "tsv", "jsonl"])
def test_make_shards_from_folder_and_caption_file(tmp_path, kind, capsys):
    images = tmp_path / "imgs"
    originals = {name: save(images / name, w, h, "PNG" if name.endswith("png") else "JPEG")
                 for name, (w, h) in {"a.jpg": (640, 480), "b.png": (30, 90), "c.jpg": (1200, 300)}.items()}
    (images / "broken.jpg").write_bytes(originals["a.jpg"][:200])
    rows = [("a.jpg", "a wide photo"), ("b.png", "a tall png"), ("c.jpg", "a banner"), ("broken.jpg", "cut off"),
            ("missing.jpg", "no such file"), ("b.png", "")]
    captions = tmp_path / f"captions.{kind}"
    if kind == "jsonl":
        captions.write_text("\n".join(json.dumps({"file": f, "caption": c}) for f, c in rows))
    else:
        sep = "\t" if kind == "tsv" else ","
        captions.write_text("filepath" + sep + "caption\n" + "\n".join(f"{f}{sep}{c}" for f, c in rows))
    out = tmp_path / "shards"
    assert main(["make-shards", "--images", str(images), "--captions", str(captions), "--out", str(out),
                 "--per-shard", "2"]) == 0
    sizes = json.loads((out / "sizes.json").read_text())
    assert sizes == {"shard-000000.tar": 2, "shard-000001.tar": 1}
    samples = shard_samples(str(out) + "/")
    by_caption = {s.caption: s for s in samples.values()}
    assert set(by_caption) == {"a wide photo", "a tall png", "a banner"}
    assert by_caption["a banner"].image.size == (1200, 300)  # native resolution kept
    with tarfile.open(out / "shard-000000.tar") as tar:
        stored = tar.extractfile(next(m for m in tar.getmembers() if m.name.endswith(".jpg"))).read()
    assert stored == originals["a.jpg"]  # the original bytes, not re-encoded
    printed = capsys.readouterr().out
    assert "skipped 3" in printed and "undecodable_image" in printed and "missing_image" in printed


def test_make_shards_from_img2dataset_folder_with_max_side(tmp_path):
    root = tmp_path / "i2d"
    save(root / "00000" / "000000001.jpg", 800, 600)
    (root / "00000" / "000000001.txt").write_text("first")
    (root / "00000" / "000000001.json").write_text('{"url": "http://example.com/1.jpg"}')
    save(root / "00000" / "000000002.jpg", 100, 50)
    (root / "00000" / "000000002.txt").write_text("second")
    save(root / "00001" / "000000003.jpg", 64, 64)  # no caption: skipped
    out = tmp_path / "shards"
    assert main(["make-shards", "--img2dataset", str(root), "--out", str(out), "--max-side", "200"]) == 0
    samples = shard_samples(str(out) + "/")
    by_caption = {s.caption: s for s in samples.values()}
    assert set(by_caption) == {"first", "second"}
    assert by_caption["first"].image.size == (200, 150)
    assert by_caption["second"].image.size == (100, 50)
    assert by_caption["first"].meta["url"] == "http://example.com/1.jpg"


def test_make_shards_bad_caption_file_names_column(tmp_path, capsys):
    captions = tmp_path / "c.csv"
    captions.write_text("name,words\nx.jpg,hello\n")
    assert main(["make-shards", "--images", str(tmp_path), "--captions", str(captions),
                 "--out", str(tmp_path / "o")]) == 2
    assert "c.csv has no image file column" in capsys.readouterr().err
    bad = tmp_path / "c.jsonl"
    bad.write_text('{"file": "x.jpg", "caption": "fine"}\n{oops\n')
    assert main(["make-shards", "--images", str(tmp_path), "--captions", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "c.jsonl line 2 is not JSON" in capsys.readouterr().err
