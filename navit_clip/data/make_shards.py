"""Build WebDataset shards from an image folder with a caption file, or from img2dataset output.

Images keep their native resolution and their original bytes unless a maximum side is asked
for. A missing, unreadable or empty image or a missing caption is reported and skipped; the
counts are returned and written to `sizes.json` with the sample count of every shard.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from PIL import Image
from tqdm import tqdm

from navit_clip.data.shards import IMAGE_EXTENSIONS, write_shards
from navit_clip.errors import InputError, MissingInputError

log = logging.getLogger(__name__)

FILE_COLUMNS = ("file", "filepath", "filename", "image", "path")
CAPTION_COLUMNS = ("caption", "text", "title", "txt")


@dataclass
class Entry:
    """One image to shard: its path, its caption (None if missing) and extra metadata."""

    path: Path
    caption: str | None
    meta: dict = field(default_factory=dict)


def _pick(columns: list[str], wanted: tuple[str, ...], what: str, source: str) -> str:
    lower = {c.lower(): c for c in columns}
    for name in wanted:
        if name in lower:
            return lower[name]
    raise InputError(f"{source} has no {what} column (looked for {', '.join(wanted)}; found {', '.join(columns)})")


def read_caption_file(captions: str | Path, images: str | Path) -> Iterator[Entry]:
    """Entries from a CSV, TSV or JSONL file naming an image (relative to `images`) and its caption."""
    captions, images = Path(captions), Path(images)
    if not captions.exists():
        raise MissingInputError(f"caption file {captions} does not exist")
    if captions.suffix.lower() in (".jsonl", ".json"):
        rows = []
        with captions.open(encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise InputError(f"{captions} line {number} is not JSON: {exc}") from exc
                if not isinstance(row, dict):
                    raise InputError(f"{captions} line {number} is not a JSON object")
                rows.append(row)
        columns = sorted({k for row in rows for k in row})
    else:
        delimiter = "\t" if captions.suffix.lower() == ".tsv" else ","
        with captions.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter=delimiter)
            rows, columns = list(reader), list(reader.fieldnames or [])
    file_col = _pick(columns, FILE_COLUMNS, "image file", str(captions))
    text_col = _pick(columns, CAPTION_COLUMNS, "caption", str(captions))
    for row in rows:
        caption = row.get(text_col)
        yield Entry(images / str(row.get(file_col, "")), None if caption is None else str(caption))


def read_image_folder(root: str | Path) -> Iterator[Entry]:
    """img2dataset's `files` output (and any folder) : every image with its sibling .txt caption
    and .json metadata, in sorted path order."""
    root = Path(root)
    if not root.is_dir():
        raise MissingInputError(f"image folder {root} does not exist")
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if path.suffix.lower().lstrip(".") not in IMAGE_EXTENSIONS:
                continue
            txt = path.with_suffix(".txt")
            caption = txt.read_text(encoding="utf-8", errors="replace") if txt.exists() else None
            meta = {}
            meta_path = path.with_suffix(".json")
            if meta_path.exists():
                try:
                    loaded = json.loads(meta_path.read_text(encoding="utf-8"))
                    meta = loaded if isinstance(loaded, dict) else {}
                except (UnicodeDecodeError, json.JSONDecodeError):
                    log.warning("ignoring unreadable metadata %s", meta_path)
            yield Entry(path, caption, meta)


class BadInput(ValueError):
    pass


def encode_entry(entry: Entry, max_side: int, max_pixels: int) -> tuple[str, bytes]:
    """-> (extension, image bytes): the original bytes, or a re-encoded copy shrunk to max_side."""
    if entry.caption is None or not entry.caption.strip():
        raise BadInput("no_caption")
    try:
        data = entry.path.read_bytes()
    except OSError as exc:
        raise BadInput("missing_image") from exc
    try:
        image = Image.open(io.BytesIO(data))
        fmt = (image.format or "").lower()
        width, height = image.size
        if width * height > max_pixels:
            raise BadInput("image_too_large")
        image.load()  # a full decode: truncated or corrupt files fail here, not in training
    except BadInput:
        raise
    except Exception as exc:  # PIL raises many types on corrupt data
        raise BadInput("undecodable_image") from exc
    ext = {"jpeg": "jpg", "png": "png", "webp": "webp"}.get(fmt)
    if max_side and max(width, height) > max_side:
        scale = max_side / max(width, height)
        image = image.convert("RGB").resize((max(1, round(width * scale)), max(1, round(height * scale))),
                                            Image.Resampling.BICUBIC)
        ext = ext if ext in ("png", "webp") else "jpg"
    elif ext is not None:
        return ext, data
    else:  # another format PIL reads (gif, bmp, ...): stored as PNG so readers can decode it
        image, ext = image.convert("RGB"), "png"
    out = io.BytesIO()
    image.save(out, format={"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[ext], **({"quality": 95} if ext == "jpg" else {}))
    return ext, out.getvalue()


def make_shards(entries: Iterator[Entry], out_dir: str | Path, *, per_shard: int = 1000, prefix: str = "shard",
                max_side: int = 0, max_pixels: int = 64_000_000, total: int | None = None) -> dict:
    """Write entries to `out_dir/prefix-%06d.tar` with `sizes.json`; return a summary."""
    out_dir = Path(out_dir)
    skipped: Counter = Counter()

    def samples() -> Iterator[dict]:
        for index, entry in enumerate(tqdm(entries, total=total, desc="make-shards", unit="img")):
            try:
                ext, data = encode_entry(entry, max_side, max_pixels)
            except BadInput as exc:
                skipped[str(exc)] += 1
                log.warning("skipping %s: %s", entry.path, exc)
                continue
            yield {"__key__": f"{index:09d}", ext: data, "txt": entry.caption.strip(),
                   "json": {**entry.meta, "source": str(entry.path)}}

    paths = write_shards(samples(), str(out_dir / f"{prefix}-%06d.tar"), max_per_shard=per_shard)
    sizes = {}
    for path in paths:
        with tarfile.open(path) as tar:
            sizes[os.path.basename(path)] = len({m.name.split(".", 1)[0] for m in tar.getmembers()})
    (out_dir / "sizes.json").write_text(json.dumps(sizes, indent=2))
    spec = str(out_dir / f"{prefix}-{{000000..{len(paths) - 1:06d}}}.tar") if paths else ""
    return {"shards": spec, "num_shards": len(paths), "num_samples": sum(sizes.values()), "skipped": dict(skipped)}
