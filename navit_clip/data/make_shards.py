"""Build WebDataset shards from an image folder with a caption file, or from img2dataset output.

Images keep their native resolution and their original bytes unless a maximum side is asked
for. A missing, unreadable or empty image or a missing caption is reported and skipped; the
counts are returned and written to `sizes.json` with the sample count of every shard.

Image paths in a caption file stay inside the image folder unless the user allows otherwise, and
shards record each image's path relative to that folder, never the user's absolute path. A folder
that already holds shards is refused unless it may be overwritten: a folder spec reads every
`.tar` in it, so older shards left beside new ones would be trained on too.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from PIL import Image
from tqdm import tqdm

from navit_clip.data.shard_files import SIZES_FILE, recorded_counts, write_shards
from navit_clip.data.shards import IMAGE_EXTENSIONS
from navit_clip.errors import InputError, MissingInputError

log = logging.getLogger(__name__)

FILE_COLUMNS = ("file", "filepath", "filename", "image", "path")
# What an earlier make-shards left in its output folder, beside its .tar shards.
OUTPUT_FILES = (SIZES_FILE, "dataset.json")
CAPTION_COLUMNS = ("caption", "text", "title", "txt")


@dataclass
class Entry:
    """One image to shard: its path, its caption (None if missing), extra metadata, and the path
    stored in the shard (relative to the image folder, or the file name alone)."""

    path: Path
    caption: str | None
    meta: dict = field(default_factory=dict)
    source: str = ""


def _pick(columns: list[str], wanted: tuple[str, ...], what: str, source: str) -> str:
    lower = {c.lower(): c for c in columns}
    for name in wanted:
        if name in lower:
            return lower[name]
    raise InputError(f"{source} has no {what} column (looked for {', '.join(wanted)}; found {', '.join(columns)})")


def _read_text(path: Path) -> str:
    """The file as UTF-8 text; anything else is refused with the line of its first bad byte."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise InputError(f"{path} line {line} is not UTF-8 (byte 0x{data[exc.start]:02x}): save the caption file "
                         "as UTF-8, e.g. `iconv -f latin1 -t utf-8`") from exc


def _read_rows(captions: Path) -> tuple[list[tuple[int, dict]], list[str]]:
    """(line number, row) of every record of a CSV, TSV or JSONL file, and its column names."""
    text = _read_text(captions)
    if captions.suffix.lower() in (".jsonl", ".json"):
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{captions} line {number} is not JSON: {exc}") from exc
            if not isinstance(row, dict):
                raise InputError(f"{captions} line {number} is not a JSON object")
            rows.append((number, row))
        return rows, sorted({k for _, row in rows for k in row})
    delimiter = "\t" if captions.suffix.lower() == ".tsv" else ","
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    rows = [(reader.line_num, row) for row in reader]
    return rows, list(reader.fieldnames or [])


def _image_path(images: Path, name: str, where: str, allow_outside: bool) -> tuple[Path, str]:
    """-> (the image's path, the path the shard records). A name that is absolute or climbs out of
    `images` is refused unless allowed; allowed, only its file name is recorded."""
    outside = Path(name).is_absolute() or Path(os.path.normpath(name or ".")).parts[:1] == ("..",)
    if outside and not allow_outside:
        raise InputError(f"{where}: image path {name!r} is outside --images {images}; "
                         "pass --allow-outside-images to read it")
    return images / name, Path(name).name if outside else Path(os.path.normpath(name or ".")).as_posix()


def read_caption_file(captions: str | Path, images: str | Path, allow_outside: bool = False) -> Iterator[Entry]:
    """Entries from a CSV, TSV or JSONL file naming an image (relative to `images`) and its caption."""
    captions, images = Path(captions), Path(images)
    if not captions.exists():
        raise MissingInputError(f"caption file {captions} does not exist")
    rows, columns = _read_rows(captions)
    file_col = _pick(columns, FILE_COLUMNS, "image file", str(captions))
    text_col = _pick(columns, CAPTION_COLUMNS, "caption", str(captions))
    entries = []
    for number, row in rows:  # every path is checked before the first shard is written
        path, source = _image_path(images, str(row.get(file_col) or ""), f"{captions} line {number}", allow_outside)
        caption = row.get(text_col)
        entries.append(Entry(path, None if caption is None else str(caption), source=source))
    yield from entries


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
            yield Entry(path, caption, meta, source=path.relative_to(root).as_posix())


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
    except Image.DecompressionBombError as exc:  # PIL's own pixel limit: the same reason as ours
        raise BadInput("image_too_large") from exc
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


def prepare_out_dir(out_dir: str | Path, overwrite: bool = False) -> Path:
    """Create the output folder and make sure it can be written; shards and summaries an earlier
    run left there are refused, or removed when `overwrite` is set."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create the output folder {out} (--out): {exc.strerror}") from exc
    old = sorted(p for p in out.iterdir() if p.is_file() and (p.suffix == ".tar" or p.name in OUTPUT_FILES))
    if old and not overwrite:
        names = ", ".join(p.name for p in old[:3]) + (f" and {len(old) - 3} more" if len(old) > 3 else "")
        raise InputError(f"the output folder {out} (--out) already holds shards ({names}): pass --overwrite to "
                         "replace them, or choose an empty folder")
    try:
        for path in old:
            path.unlink()
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        raise InputError(f"cannot write to the output folder {out} (--out): {exc.strerror}") from exc
    return out


def make_shards(entries: Iterator[Entry], out_dir: str | Path, *, per_shard: int = 1000, prefix: str = "shard",
                max_side: int = 0, max_pixels: int = 64_000_000, total: int | None = None,
                overwrite: bool = False) -> dict:
    """Write entries to `out_dir/prefix-%06d.tar` with `sizes.json`; return a summary."""
    if per_shard < 1:
        raise InputError(f"--per-shard must be at least 1 (samples per shard), got {per_shard}")
    if max_side < 0:
        raise InputError(f"--max-side must be 0 (keep the native size) or a positive side, got {max_side}")
    out_dir = prepare_out_dir(out_dir, overwrite)
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
                   "json": {**entry.meta, "source": entry.source or entry.path.name}}

    paths = write_shards(samples(), str(out_dir / f"{prefix}-%06d.tar"), max_per_shard=per_shard)
    recorded = recorded_counts(out_dir)  # written beside the shards by write_shards
    sizes = {os.path.basename(path): recorded[os.path.basename(path)] for path in paths}
    spec = str(out_dir / f"{prefix}-{{000000..{len(paths) - 1:06d}}}.tar") if paths else ""
    return {"shards": spec, "num_shards": len(paths), "num_samples": sum(sizes.values()), "skipped": dict(skipped)}
