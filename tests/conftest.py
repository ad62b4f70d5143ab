"""Shared fixtures for the test suite.

Fixtures here are self-contained and prefixed by what they build; add new ones below, keeping
names specific (e.g. `tiny_shards`, not `shards`).
"""

from __future__ import annotations

import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from navit_clip.data.shard_files import write_shards

# `attention: auto` picks its backend by timing, which differs from process to process; tests that
# compare separate runs bit for bit need the same backend in each, so the suite (and every process
# it starts) uses the fixed rule. tests/test_attention.py exercises the timed choice itself.
os.environ.setdefault("NAVIT_CLIP_AUTO_ATTENTION", "rule")


def stream_from_config(shards: str, overrides: list[str], **fields):
    """A stream spec built as training builds it (`stream_spec`), from config overrides, then
    with spec `fields` (loop, seed, ...) replaced."""
    from dataclasses import replace

    from navit_clip.config import load_config
    from navit_clip.data.spec import stream_spec

    return replace(stream_spec(load_config(None, overrides)), shards=shards, **fields)


# ---------------------------------------------------------------------------------------------
# tiny_shards: a handful of small WebDataset shards written with navit_clip's own writer
# ---------------------------------------------------------------------------------------------

#: (width, height, PIL mode) of every tiny_shards image: wide, tall, square, 16..200 px, with a
#: grayscale and an RGBA image to exercise the RGB conversion.
TINY_SHARD_SIZES: tuple[tuple[int, int, str], ...] = (
    (200, 50, "RGB"), (50, 200, "RGB"), (64, 64, "RGB"), (16, 16, "RGB"), (17, 33, "RGB"),
    (120, 90, "RGB"), (90, 120, "L"), (200, 200, "RGB"), (160, 24, "RGB"), (24, 160, "RGBA"),
    (32, 48, "RGB"), (48, 32, "RGB"), (100, 100, "RGB"), (199, 101, "RGB"), (101, 199, "RGB"),
    (16, 120, "RGB"), (120, 16, "RGB"), (80, 60, "L"), (60, 80, "RGB"), (40, 40, "RGB"),
    (180, 70, "RGB"), (70, 180, "RGB"), (23, 29, "RGB"),
)
TINY_SHARDS_PER_SHARD = 5  # 23 samples -> 5 shards of 5, 5, 5, 5, 3 samples


@dataclass(frozen=True)
class TinyShards:
    spec: str  # brace pattern covering every shard, e.g. ".../tiny-{000000..000004}.tar"
    count: int  # number of samples in all shards
    paths: tuple[str, ...]  # the shard files, in order
    keys: tuple[str, ...]  # every sample key, in write order
    sizes: dict  # key -> (width, height)
    captions: dict  # key -> caption
    labels: dict  # key -> int label
    directory: Path


def make_tiny_image(width: int, height: int, mode: str, seed: int) -> Image.Image:
    """A smooth gradient with a little noise (compresses fast, not constant)."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    base = np.stack([xs * 255 // max(1, width - 1), ys * 255 // max(1, height - 1),
                     (xs + ys) * 127 // max(1, width + height - 2)], axis=-1)
    pixels = np.clip(base + rng.integers(0, 16, base.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    return image.convert(mode) if mode != "RGB" else image


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory: pytest.TempPathFactory) -> TinyShards:
    """23 small samples (key.png, key.txt, key.json {"label": int}) in 5 shards."""
    directory = tmp_path_factory.mktemp("tiny_shards")
    samples, keys, sizes, captions, labels = [], [], {}, {}, {}
    for i, (width, height, mode) in enumerate(TINY_SHARD_SIZES):
        key = f"tiny{i:04d}"
        shape = "wide" if width > height else "tall" if height > width else "square"
        caption = f"a {shape} picture number {i} of {width} by {height} pixels"
        label = i % 7
        samples.append({"__key__": key, "png": png_bytes(make_tiny_image(width, height, mode, i)),
                        "txt": caption, "json": {"label": label}})
        keys.append(key)
        sizes[key] = (width, height)
        captions[key] = caption
        labels[key] = label
    paths = write_shards(samples, str(directory / "tiny-%06d.tar"), max_per_shard=TINY_SHARDS_PER_SHARD)
    assert len(paths) == 5, paths
    spec = str(directory / f"tiny-{{000000..{len(paths) - 1:06d}}}.tar")
    return TinyShards(spec=spec, count=len(samples), paths=tuple(paths), keys=tuple(keys), sizes=sizes,
                      captions=captions, labels=labels, directory=directory)


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> str:
    """A tar shard written member by member, for shards the library's writer would refuse."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)
