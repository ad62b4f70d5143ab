"""List, split and read WebDataset shards; decode samples safely and count the bad ones.

Only images (png/jpg/jpeg/webp), UTF-8 text and JSON are decoded. Nothing from a shard is ever
unpickled, and a sample that fails to decode is skipped, logged with its shard and key, and
counted, so one broken file never stops a run.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import webdataset as wds
from braceexpand import braceexpand
from PIL import Image

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
TEXT_EXTENSIONS = ("txt", "caption")


class ShardError(ValueError):
    """A shard specification matches nothing, or names a file that is missing."""


@dataclass
class Sample:
    key: str
    image: Image.Image  # RGB
    caption: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class ReadStats:
    """What the reader saw: samples decoded and samples skipped, by reason."""

    decoded: int = 0
    skipped: Counter = field(default_factory=Counter)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())


def _split_top_level_commas(spec: str) -> list[str]:
    """Split a list of shard specs on commas that are not inside braces ({a,b} is brace syntax)."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(spec):
        depth += (ch == "{") - (ch == "}")
        if ch == "," and depth == 0:
            parts.append(spec[start:i])
            start = i + 1
    parts.append(spec[start:])
    return parts


def expand_shards(spec: str) -> list[str]:
    """`dir/`, `a-{000..009}.tar`, globs and comma-separated lists -> a sorted list of shard paths."""
    paths: list[str] = []
    for part in (p.strip() for p in _split_top_level_commas(spec) if p.strip()):
        if os.path.isdir(part):
            paths.extend(sorted(glob.glob(os.path.join(part, "*.tar"))))
            continue
        for item in braceexpand(part):
            if "://" in item or item.startswith("pipe:"):
                paths.append(item)  # remote shards: opened by webdataset's gopen when read
            elif any(ch in item for ch in "*?["):
                paths.extend(sorted(glob.glob(item)))
            elif os.path.exists(item):
                paths.append(item)
            else:
                raise ShardError(f"shard {item} (from {spec!r}) does not exist")
    if not paths:
        raise ShardError(f"shard spec {spec!r} matches no shard")
    return paths


@dataclass(frozen=True)
class ShardSplit:
    """Which shards one (rank, worker) reads, and which samples of them it keeps.

    With at least one shard per reader, readers take disjoint shards; with fewer shards than
    readers every reader opens all shards and keeps every `stride`-th sample, so no sample is
    read twice in an epoch either way.
    """

    shards: tuple[str, ...]
    stride: int = 1
    offset: int = 0


def split_shards(shards: list[str], rank: int, world: int, worker: int, num_workers: int) -> ShardSplit:
    readers = world * num_workers
    reader = rank * num_workers + worker
    if len(shards) >= readers:
        if len(shards) % readers:
            log.warning("%d shards over %d readers: readers with fewer shards repeat theirs more often "
                        "(use a multiple of %d shards for even sampling)", len(shards), readers, readers)
        return ShardSplit(tuple(shards[reader::readers]))
    log.warning("%d shards for %d readers: every reader scans all shards and keeps 1/%d of the samples",
                len(shards), readers, readers)
    return ShardSplit(tuple(shards), stride=readers, offset=reader)


def read_raw(shards: Iterable[str], stats: ReadStats) -> Iterator[dict[str, Any]]:
    """Yield raw samples ({'__key__', '__url__', ext: bytes}) from tar shards, skipping broken ones."""

    def handler(exc: Exception) -> bool:
        stats.skipped["unreadable_tar_member"] += 1
        log.warning("skipping unreadable data: %s", exc)
        return True

    opened = wds.tariterators.url_opener(({"url": s} for s in shards), handler=handler)
    files = wds.tariterators.tar_file_expander(opened, handler=handler)
    yield from wds.tariterators.group_by_keys(files, handler=handler)


class BadSample(ValueError):
    pass


def decode_sample(raw: dict[str, Any], max_pixels: int) -> Sample:
    """Decode one raw sample; raise BadSample with the reason if it cannot be used."""
    key = raw.get("__key__", "?")
    image_ext = next((e for e in IMAGE_EXTENSIONS if e in raw), None)
    if image_ext is None:
        raise BadSample("no_image")
    text_ext = next((e for e in TEXT_EXTENSIONS if e in raw), None)
    if text_ext is None:
        raise BadSample("no_caption")
    try:
        image = Image.open(io.BytesIO(raw[image_ext]))
        width, height = image.size
        if width * height > max_pixels:
            raise BadSample("image_too_large")
        if width < 1 or height < 1:
            raise BadSample("empty_image")
        image = image.convert("RGB")  # forces the full decode here, inside the try
    except BadSample:
        raise
    except Exception as exc:  # PIL raises many types on corrupt data
        raise BadSample("undecodable_image") from exc
    try:
        caption = raw[text_ext].decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        raise BadSample("caption_not_utf8") from exc
    if not caption:
        raise BadSample("empty_caption")
    meta: dict[str, Any] = {}
    if "json" in raw:
        try:
            meta = json.loads(raw["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BadSample("bad_json") from exc
        if not isinstance(meta, dict):
            raise BadSample("bad_json")
    return Sample(key=key, image=image, caption=caption, meta=meta)


def read_samples(split: ShardSplit, stats: ReadStats, max_pixels: int = 64_000_000) -> Iterator[Sample]:
    """Decoded samples of one reader's split, in shard order; bad samples are skipped and counted."""
    for index, raw in enumerate(read_raw(split.shards, stats)):
        if index % split.stride != split.offset:
            continue
        try:
            sample = decode_sample(raw, max_pixels)
        except BadSample as exc:
            stats.skipped[str(exc)] += 1
            log.warning("skipping sample %s in shard %s: %s", raw.get("__key__"), raw.get("__url__"), exc)
            continue
        stats.decoded += 1
        yield sample


def write_shards(samples: Iterable[dict[str, Any]], pattern: str, max_per_shard: int) -> list[str]:
    """Write samples ({'__key__', 'png': bytes, 'txt': str, 'json': dict}) to shards named by pattern % i."""
    os.makedirs(os.path.dirname(pattern) or ".", exist_ok=True)
    written: list[str] = []
    with wds.ShardWriter(pattern, maxcount=max_per_shard, verbose=0, post=written.append) as sink:
        for sample in samples:
            sink.write(sample)
    return written
