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
from typing import Any, Callable, Iterator

from braceexpand import braceexpand
from PIL import Image
from navit_clip.data.shard_files import read_raw
from navit_clip.errors import UserError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
TEXT_EXTENSIONS = ("txt", "caption")

#: Reasons a sample is skipped, in the order training metrics report them ("other" takes the rest).
SKIP_REASONS = ("unreadable_tar_member", "no_image", "no_caption", "undecodable_image", "image_too_large",
                "image_too_small", "empty_image", "caption_not_utf8", "empty_caption", "bad_json", "truncated_shard",
                "other")


def skip_counts(by_reason: dict[str, int]) -> list[int]:
    """Counts in SKIP_REASONS order, unknown reasons in "other": a vector ranks can all-reduce."""
    counts = [int(by_reason.get(reason, 0)) for reason in SKIP_REASONS[:-1]]
    return counts + [sum(n for reason, n in by_reason.items() if reason not in SKIP_REASONS[:-1])]


class ShardError(UserError, ValueError):
    """A shard specification matches nothing, or names a file that is missing."""


class NoUsableSampleError(ShardError, RuntimeError):
    """A reader found no usable sample in its shards (empty or garbage tars, all samples broken)."""


@dataclass
class Sample:
    key: str
    image: Image.Image  # RGB, or L for a greyscale file (patchify makes its patches RGB)
    caption: str
    meta: dict[str, Any] = field(default_factory=dict)
    native_size: tuple[int, int] | None = None  # (width, height) in the file, if decoded smaller


@dataclass
class ReadStats:
    """What the reader saw: samples decoded and samples skipped, by reason."""

    decoded: int = 0
    skipped: Counter = field(default_factory=Counter)
    unreadable: dict[str, str] = field(default_factory=dict)  # shard -> why it could not be read

    def no_usable(self, what: str, shards: list[str]) -> NoUsableSampleError:
        """The error for a reader that found no usable `what` in `shards`, naming the shards and why."""
        named = [f"{shard} ({self.unreadable[shard]})" if shard in self.unreadable else shard for shard in shards[:3]]
        more = f" and {len(shards) - 3} more" if len(shards) > 3 else ""
        return NoUsableSampleError(f"no usable {what} in shard{'s' if len(shards) > 1 else ''} {', '.join(named)}"
                                   f"{more} (skipped: {dict(self.skipped)})")

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())


def _split_top_level_commas(spec: str) -> list[str]:
    """Split a list of shard specs on commas (and the semicolons between sources) that are not
    inside braces ({a,b} is brace syntax)."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(spec):
        depth += (ch == "{") - (ch == "}")
        if ch in ",;" and depth == 0:
            parts.append(spec[start:i])
            start = i + 1
    parts.append(spec[start:])
    return parts


def expand_shards(spec: str, allow_pipe: bool = False) -> list[str]:
    """`dir/`, `a-{000..009}.tar`, globs and comma-separated lists -> a sorted list of shard paths.

    `pipe:` URLs run a shell command, so they are refused unless `allow_pipe` is set.
    """
    paths: list[str] = []
    for part in (p.strip() for p in _split_top_level_commas(spec) if p.strip()):
        if os.path.isdir(part):
            paths.extend(sorted(glob.glob(os.path.join(part, "*.tar"))))
            continue
        for item in braceexpand(part):
            if item.startswith("pipe:") and not allow_pipe:
                raise ShardError(f"shard {item!r} is a pipe: command; set data.sources.allow_pipe=true to run shell "
                                 "commands from shard specs")
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


class BadSample(ValueError):
    pass


def decode_sample(raw: dict[str, Any], max_pixels: int, min_side: int = 1,
                  draft: Callable[[int, int], tuple[int, int]] | None = None) -> Sample:
    """Decode one raw sample; raise BadSample with the reason if it cannot be used.

    `draft(width, height)` may name the smallest size the image will be used at; a JPEG is then
    decoded directly at a power-of-two reduction no smaller than that (libjpeg's DCT scaling),
    several times faster than a full decode followed by a resize.
    """
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
        if width < min_side or height < min_side:
            raise BadSample("image_too_small")
        if draft is not None and image.format == "JPEG":
            image.draft("RGB", draft(width, height))
        # A greyscale image stays one channel until it is resized (patchify): a third of the work.
        image = image if image.mode == "L" else image.convert("RGB")
        image.load()  # the full decode here, inside the try
    except BadSample:
        raise
    except Image.DecompressionBombError as exc:  # PIL's own pixel limit: the same reason as ours
        raise BadSample("image_too_large") from exc
    except Exception as exc:  # PIL raises many types on corrupt data
        raise BadSample("undecodable_image") from exc
    caption = decode_caption(raw, text_ext)
    meta: dict[str, Any] = {}
    if "json" in raw:
        try:
            meta = json.loads(raw["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BadSample("bad_json") from exc
        if not isinstance(meta, dict):
            raise BadSample("bad_json")
    native = (width, height) if image.size != (width, height) else None
    return Sample(key=key, image=image, caption=caption, meta=meta, native_size=native)


def decode_caption(raw: dict[str, Any], text_ext: str | None = None) -> str:
    """A raw sample's caption; raise BadSample if it has none, or one that is not UTF-8 or empty."""
    text_ext = text_ext or next((e for e in TEXT_EXTENSIONS if e in raw), None)
    if text_ext is None:
        raise BadSample("no_caption")
    try:
        caption = raw[text_ext].decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        raise BadSample("caption_not_utf8") from exc
    if not caption:
        raise BadSample("empty_caption")
    return caption


def read_samples(split: ShardSplit, stats: ReadStats, max_pixels: int = 64_000_000,
                 min_side: int = 1, draft: Callable[[int, int], tuple[int, int]] | None = None) -> Iterator[Sample]:
    """Decoded samples of one reader's split, in shard order; bad samples are skipped and counted.
    Images with a side below `min_side` pixels (less than one patch) are skipped as too small."""
    for index, raw in enumerate(read_raw(split.shards, stats, split.stride, split.offset)):
        if index % split.stride != split.offset:
            continue
        try:
            sample = decode_sample(raw, max_pixels, min_side, draft)
        except BadSample as exc:
            stats.skipped[str(exc)] += 1
            log.warning("skipping sample %s in shard %s: %s", raw.get("__key__"), raw.get("__url__"), exc)
            continue
        stats.decoded += 1
        yield sample


def split_sources(spec: str) -> list[str]:
    """`a-{0..9}.tar ; b/` -> one shard spec per source (sources are separated by semicolons)."""
    sources = [part.strip() for part in spec.split(";") if part.strip()]
    if not sources:
        raise ShardError(f"shard spec {spec!r} names no source")
    return sources


def parse_weights(weights: str, num_sources: int) -> list[float]:
    """`"0.7,0.3"` -> [0.7, 0.3]; empty -> equal weights. Raises ShardError naming the problem."""
    if not weights.strip():
        return [1.0] * num_sources
    try:
        values = [float(w) for w in weights.split(",")]
    except ValueError as exc:
        raise ShardError(f"data.sources.weights {weights!r} must be comma-separated numbers") from exc
    if len(values) != num_sources:
        raise ShardError(f"data.sources.weights has {len(values)} weights for {num_sources} shard sources")
    if any(v < 0 for v in values) or sum(values) <= 0:
        raise ShardError(f"data.sources.weights {weights!r} must be >= 0 with a positive sum")
    return values


def interleave(streams: list[Iterator[Sample]], weights: list[float], rng: Any) -> Iterator[Sample]:
    """Draw the next sample from a source chosen by weight until every source is exhausted, so a
    single pass still reads every sample of every source exactly once."""
    active = [i for i, w in enumerate(weights) if w > 0]
    while active:
        probs = [weights[i] for i in active]
        total = sum(probs)
        pick = active[int(rng.choice(len(active), p=[p / total for p in probs]))] if len(active) > 1 else active[0]
        try:
            yield next(streams[pick])
        except StopIteration:
            active.remove(pick)
