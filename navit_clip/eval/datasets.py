"""Evaluation data, from any of the layouts users have: one reader per layout, one item type out.

- image folder: `root/<class>/*.png|jpg|jpeg|webp`, one folder per class (classification);
- WebDataset shards: CLIP_benchmark's `wds/` layout (`root/<split>/*.tar` with `cls` labels or
  newline-separated `txt` captions, `classnames.txt`, `zeroshot_classification_templates.txt`,
  `dataset_type.txt`), or navit-clip shards with `dataset.json` beside them;
- CSV with `path,caption` columns (retrieval; several rows may share one image).

Broken images are skipped, logged with their file or shard and key, and counted; a layout that
cannot be used at all (missing class folder, CSV without its columns, no split) is an error
naming what is missing.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from braceexpand import braceexpand
from PIL import Image

from navit_clip.data.shard_files import read_raw
from navit_clip.data.shards import IMAGE_EXTENSIONS, ReadStats, expand_shards
from navit_clip.errors import InputError, MissingInputError

log = logging.getLogger(__name__)

MAX_PIXELS = 64_000_000


@dataclass
class EvalItem:
    key: str
    image: Image.Image  # RGB
    label: int | None = None
    captions: list[str] = field(default_factory=list)


@dataclass
class EvalDataset:
    name: str
    kind: str  # classification | retrieval
    read: Callable[[ReadStats], Iterator[EvalItem]]  # a fresh pass over the items each call
    class_names: list[str] | None = None
    templates: list[str] | None = None  # the dataset's own prompts, if it has any
    size: int | None = None  # for the progress bar, when known


def decode_image(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Bytes -> RGB image; raises ValueError with the reason."""
    try:
        image = Image.open(io.BytesIO(data))
        if image.width * image.height > max_pixels:
            raise ValueError(f"image of {image.width}x{image.height} pixels is larger than {max_pixels}")
        return image.convert("RGB")
    except ValueError:
        raise
    except Exception as exc:  # PIL raises many types on corrupt data
        raise ValueError(f"undecodable image ({type(exc).__name__}: {exc})") from exc


def _read_file_image(path: Path, stats: ReadStats) -> Image.Image | None:
    try:
        return decode_image(path.read_bytes())
    except (OSError, ValueError) as exc:
        stats.skipped["unreadable_image"] += 1
        log.warning("skipping unreadable image %s: %s", path, exc)
        return None


def read_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------
# image folder
# ---------------------------------------------------------------------------------------------

def image_folder(root: str | Path, class_names_file: str | Path | None = None) -> EvalDataset:
    """Class k is the k-th folder in sorted order, named after it (underscores read as spaces),
    or, with a class-names file, the k-th line, whose folder (`name` or `name_with_underscores`)
    must exist."""
    root = Path(root)
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    if class_names_file is not None:
        if not Path(class_names_file).is_file():
            raise MissingInputError(f"class names file {class_names_file} does not exist")
        names = read_lines(Path(class_names_file))
        chosen = []
        for name in names:
            candidates = [root / name, root / name.replace(" ", "_")]
            found = next((c for c in candidates if c.is_dir()), None)
            if found is None:
                raise MissingInputError(f"class folder for {name!r} is missing: expected {candidates[-1]} "
                                        f"(class names from {class_names_file})")
            chosen.append(found)
        folders = chosen
    else:
        names = [p.name.replace("_", " ") for p in folders]
    if not folders:
        raise MissingInputError(f"{root} holds no class folder (expected {root}/<class>/<image>.png|jpg|...)")
    files = [(label, path) for label, folder in enumerate(folders) for path in sorted(folder.iterdir())
             if path.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS]
    for label, folder in enumerate(folders):
        if not any(lab == label for lab, _ in files):
            log.warning("class folder %s holds no image", folder)

    def read(stats: ReadStats) -> Iterator[EvalItem]:
        for label, path in files:
            image = _read_file_image(path, stats)
            if image is not None:
                stats.decoded += 1
                yield EvalItem(key=str(path.relative_to(root)), image=image, label=label)

    return EvalDataset(name=root.name, kind="classification", read=read, class_names=names, size=len(files))


# ---------------------------------------------------------------------------------------------
# CSV of path,caption
# ---------------------------------------------------------------------------------------------

def caption_csv(path: str | Path) -> EvalDataset:
    """Rows `path,caption` (a header naming both columns); rows that repeat a path add captions to
    that image. Relative paths are taken from the CSV's folder."""
    path = Path(path)
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"path", "caption"} - set(reader.fieldnames or ())
        if missing:
            raise InputError(f"{path} needs a header with columns path,caption; missing {sorted(missing)}")
        captions: dict[str, list[str]] = {}
        for line, row in enumerate(reader, start=2):
            if not row["path"] or row["caption"] is None:
                raise InputError(f"{path} line {line}: empty path or caption")
            captions.setdefault(row["path"], []).append(row["caption"].strip())
    for image_path in captions:
        full = path.parent / image_path
        if not full.exists():
            raise MissingInputError(f"{path} names image {image_path}, which does not exist ({full})")

    def read(stats: ReadStats) -> Iterator[EvalItem]:
        for image_path, texts in captions.items():
            image = _read_file_image(path.parent / image_path, stats)
            if image is not None:
                stats.decoded += 1
                yield EvalItem(key=image_path, image=image, captions=texts)

    return EvalDataset(name=path.stem, kind="retrieval", read=read, size=len(captions))


# ---------------------------------------------------------------------------------------------
# WebDataset shards
# ---------------------------------------------------------------------------------------------

def _shard_items(shards: list[str], stats: ReadStats) -> Iterator[EvalItem]:
    """Image + `cls` (or json `label`) + `txt` captions (one per line) of each sample."""
    for index, raw in enumerate(read_raw(shards, stats)):
        where = f"sample {raw.get('__key__')} in shard {raw.get('__url__')}"
        image_ext = next((e for e in IMAGE_EXTENSIONS if e in raw), None)
        if image_ext is None:
            stats.skipped["no_image"] += 1
            log.warning("skipping %s: no image", where)
            continue
        try:
            image = decode_image(raw[image_ext])
            label = None
            if "cls" in raw:
                label = int(raw["cls"].decode("utf-8").strip())
            elif "json" in raw:
                meta = json.loads(raw["json"].decode("utf-8"))
                label = meta.get("label") if isinstance(meta, dict) else None
            text = raw.get("txt", raw.get("caption", b"")).decode("utf-8")
        except (ValueError, UnicodeDecodeError) as exc:
            stats.skipped["undecodable_sample"] += 1
            log.warning("skipping %s: %s", where, exc)
            continue
        stats.decoded += 1
        # sample keys may repeat across shards; the index keeps them apart
        yield EvalItem(key=f"{index}/{raw.get('__key__')}", image=image, label=label,
                       captions=[c.strip() for c in text.splitlines() if c.strip()])


def _numeric_order(path: str) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", Path(path).name))


def clip_benchmark_wds(root: str | Path, split: str = "test") -> EvalDataset:
    """CLIP_benchmark's `wds/` layout (see the module docstring)."""
    root = Path(root)
    split_dir = root / split
    shards = sorted((str(p) for p in split_dir.glob("*.tar")), key=_numeric_order) if split_dir.is_dir() else []
    if not shards:
        splits = sorted(p.name for p in root.iterdir() if p.is_dir() and any(p.glob("*.tar")))
        raise MissingInputError(f"{split_dir} holds no .tar shard (splits with shards: {splits or 'none'})")
    kind_file = root / "dataset_type.txt"
    kind = kind_file.read_text().strip().lower() if kind_file.exists() else "classification"
    if kind not in ("classification", "retrieval"):
        raise InputError(f"{kind_file} says {kind!r}; navit-clip evaluates classification or retrieval")
    names = templates = None
    if kind == "classification":
        names_file = root / "classnames.txt"
        if not names_file.exists():
            raise MissingInputError(f"{root} is a classification dataset without classnames.txt")
        names = read_lines(names_file)
        templates_file = root / "zeroshot_classification_templates.txt"
        templates = read_lines(templates_file) if templates_file.exists() else None
    return EvalDataset(name=root.name, kind=kind, read=lambda stats: _shard_items(shards, stats),
                       class_names=names, templates=templates)


def navit_shards(spec: str) -> EvalDataset:
    """navit-clip shards: classification when `dataset.json` beside them lists `class_names`
    (labels in each sample's json `label`), otherwise caption retrieval; the shards it names as
    `retrieval_shards` are always retrieval."""
    shards = expand_shards(spec)
    info_path = Path(shards[0]).parent / "dataset.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    name = info.get("name", Path(shards[0]).parent.name)
    read = lambda stats: _shard_items(shards, stats)  # noqa: E731
    # num_eval counts the images of the eval shards dataset.json names: a size for these shards only
    names = {Path(p).name for p in shards}
    eval_names = {Path(p).name for p in braceexpand(info.get("eval_shards", ""))}
    size = info.get("num_eval") if names == eval_names else None
    if names == {Path(p).name for p in braceexpand(info.get("retrieval_shards", ""))}:  # captioned test set
        return EvalDataset(name=name, kind="retrieval", read=read, size=info.get("num_retrieval"))
    if "class_names" in info:
        return EvalDataset(name=name, kind="classification", read=read, class_names=list(info["class_names"]),
                           templates=list(info.get("templates") or []) or None, size=size)
    return EvalDataset(name=name, kind="retrieval", read=read)


def open_dataset(source: str, split: str = "test", class_names_file: str | None = None) -> EvalDataset:
    """Pick the reader from what `source` is: a CSV, a CLIP_benchmark wds root (a `split`
    folder with .tar shards, or its metadata files), an image folder, or a shard spec."""
    path = Path(source)
    if path.suffix.lower() == ".csv":
        if not path.exists():
            raise MissingInputError(f"caption CSV {path} does not exist")
        return caption_csv(path)
    if path.is_dir():
        markers = ("classnames.txt", "dataset_type.txt", "zeroshot_classification_templates.txt")
        if any((path / m).exists() for m in markers) or any((path / split).glob("*.tar")):
            return clip_benchmark_wds(path, split)
        if any(path.glob("*.tar")):
            return navit_shards(str(path))
        return image_folder(path, class_names_file)
    return navit_shards(source)
