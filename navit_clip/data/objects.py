"""The second bundled dataset: everyday objects, one to three per canvas, captions that list them.

The objects are symbol glyphs of the DejaVu Sans font that matplotlib ships (an umbrella, a sun,
a star, ...), so nothing is downloaded. The digits set favours NaViT by construction: one digit
on a canvas up to 4:1, which a square centre crop cuts off. Here canvases have photographic
aspect ratios (9:16 to 16:9), several objects in varied colours, sizes, turns and places share a
canvas on a varied background, and the caption names them all, sometimes with colours, count and
order: what decides is telling the objects apart and matching words to them, not the shape.

Three sets, from one seeded generator, written beside `dataset.json`:
- `train-*.tar`: 8,000 canvases of 1-3 objects, captions in varied wordings (`captions.py`);
- `eval-*.tar`: 1,000 single-object canvases, 50 per class, for zero-shot classification with
  prompts no training caption words (`EVAL_TEMPLATES`);
- `retrieval-*.tar`: 1,000 canvases of 2-3 objects, each captioned with every object's colour,
  left to right; no two captions are the same.
Each sample's json holds what was drawn: every object's class, colour and box, the background.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from navit_clip.data.object_captions import (BACKGROUNDS, COLOURS, EVAL_TEMPLATES, OBJECTS, full_caption,
                                             train_caption)
from navit_clip.data.shard_files import write_shards

CLASS_NAMES = tuple(name for name, _ in OBJECTS)
# Photographic aspect ratios (width / height) and how often each is drawn: mostly 1:1 and 4:3,
# some 16:9 and portrait, none beyond 16:9.
ASPECTS = {1.0: 0.25, 4 / 3: 0.2, 3 / 4: 0.15, 3 / 2: 0.12, 2 / 3: 0.1, 16 / 9: 0.1, 9 / 16: 0.08}
# JPEG, as photographs are stored: several times faster to write than PNG and smaller on gradients
JPEG_QUALITY = 90
BASE_SIZE = 128  # glyphs are drawn once at this font size, then scaled
# Canvases of one, two and three objects: mostly one, so that a word has one object to attach to
# (with 35/40/25% neither a NaViT nor open_clip_train run learned any object in 600 steps).
OBJECT_COUNT_SHARES = (0.7, 0.2, 0.1)
MIN_CONTRAST = 140.0  # RGB distance between an object's colour and every background colour
_PALETTE = np.array(list(COLOURS.values()), dtype=np.float32)


@dataclass(frozen=True)
class CanvasSpec:
    short_side: tuple[int, int] = (64, 224)  # pixels
    max_long_side: int = 400
    # each object's longer side, as a fraction of the canvas's short side, by objects on the canvas
    object_fraction: tuple[tuple[float, float], ...] = ((0.45, 0.85), (0.35, 0.6), (0.3, 0.5))
    max_turn: float = 20.0  # degrees either way


@lru_cache(maxsize=None)
def glyph_mask(label: int, stroke: int) -> Image.Image:
    """The class's glyph as an 8-bit mask cropped to its ink, drawn with `stroke` extra pixels."""
    from matplotlib import font_manager

    font = ImageFont.truetype(font_manager.findfont("DejaVu Sans"), BASE_SIZE)
    canvas = Image.new("L", (BASE_SIZE * 2, BASE_SIZE * 2), 0)
    ImageDraw.Draw(canvas).text((BASE_SIZE // 2, BASE_SIZE // 4), OBJECTS[label][1], font=font, fill=255,
                                stroke_width=stroke, stroke_fill=255)
    return canvas.crop(canvas.getbbox())


def _background(width: int, height: int, rng: np.random.Generator) -> tuple[Image.Image, str, list[np.ndarray]]:
    """A plain or gradient canvas -> (image, colour name, the colours it spans)."""
    name = str(rng.choice(list(BACKGROUNDS)))
    base = np.array(BACKGROUNDS[name], dtype=np.float32)
    if rng.random() < 0.5:
        return Image.new("RGB", (width, height), tuple(int(v) for v in base)), name, [base]
    other = np.clip(base + rng.uniform(-35, 35), 0, 255)
    angle = rng.uniform(0, 2 * np.pi)
    xs = np.linspace(0, np.cos(angle), width, dtype=np.float32)
    ys = np.linspace(0, np.sin(angle), height, dtype=np.float32)
    t = ys[:, None, None] + xs[None, :, None]
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    pixels = base + (other - base).astype(np.float32) * t
    return Image.fromarray(pixels.round().astype(np.uint8)), name, [base, other]


def _canvas_size(rng: np.random.Generator, spec: CanvasSpec) -> tuple[int, int]:
    aspect = float(rng.choice(list(ASPECTS), p=list(ASPECTS.values()))) * float(rng.uniform(0.95, 1.05))
    short = int(rng.integers(spec.short_side[0], spec.short_side[1] + 1))
    long = min(spec.max_long_side, int(round(short * max(aspect, 1 / aspect))))
    return (long, short) if aspect >= 1 else (short, long)


def _colour(background: list[np.ndarray], taken: set[str], rng: np.random.Generator) -> str:
    """A named colour far enough from every background colour; not one already used if it can be helped."""
    distance = np.linalg.norm(_PALETTE[:, None, :] - np.stack(background)[None], axis=-1).min(axis=1)
    usable = [n for n, d in zip(COLOURS, distance) if d >= MIN_CONTRAST]
    fresh = [n for n in usable if n not in taken]
    return str(rng.choice(fresh or usable))


def _object_mask(label: int, size: int, rng: np.random.Generator, spec: CanvasSpec) -> Image.Image:
    glyph = glyph_mask(label, int(rng.choice([0, 3])))
    if rng.random() < 0.5:
        glyph = glyph.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    scale = size / max(glyph.size)
    stretch = float(rng.uniform(0.85, 1.15))
    glyph = glyph.resize((max(4, round(glyph.width * scale * stretch)), max(4, round(glyph.height * scale))),
                         Image.Resampling.BILINEAR)
    glyph = glyph.rotate(float(rng.uniform(-spec.max_turn, spec.max_turn)), Image.Resampling.BILINEAR, expand=True)
    return glyph.crop(glyph.getbbox())


def _place(mask: Image.Image, width: int, height: int, boxes: list[tuple[int, int, int, int]],
           rng: np.random.Generator) -> tuple[int, int, int, int] | None:
    """A free box for the mask on the canvas (no overlap with `boxes`), or None after 30 tries."""
    if mask.width > width or mask.height > height:
        return None
    for _ in range(30):
        x, y = int(rng.integers(0, width - mask.width + 1)), int(rng.integers(0, height - mask.height + 1))
        box = (x, y, x + mask.width, y + mask.height)
        if all(box[2] <= b[0] or b[2] <= box[0] or box[3] <= b[1] or b[3] <= box[1] for b in boxes):
            return box
    return None


def render(labels: list[int], rng: np.random.Generator, spec: CanvasSpec = CanvasSpec()) -> tuple[Image.Image, dict]:
    """Draw the objects `labels` on a new canvas -> (image, what was drawn: size, background and
    each object's class, label, colour and box). An object that does not fit is drawn smaller."""
    width, height = _canvas_size(rng, spec)
    canvas, background, spans = _background(width, height, rng)
    low, high = spec.object_fraction[min(len(labels), len(spec.object_fraction)) - 1]
    objects: list[dict] = []
    for label in labels:
        colour = _colour(spans, {o["colour"] for o in objects}, rng)
        size = int(min(width, height) * rng.uniform(low, high))
        box = None
        while box is None:
            mask = _object_mask(label, max(8, size), rng, spec)
            box = _place(mask, width, height, [tuple(o["box"]) for o in objects], rng)
            size = int(size * 0.8)
        canvas.paste(Image.new("RGB", mask.size, COLOURS[colour]), box[:2], mask=mask)
        objects.append({"class_name": CLASS_NAMES[label], "label": label, "colour": colour, "box": list(box)})
    return canvas, {"width": width, "height": height, "background": background, "objects": objects}


def _encode(key: str, canvas: Image.Image, caption: str, meta: dict) -> dict:
    buffer = io.BytesIO()
    canvas.save(buffer, format="JPEG", quality=JPEG_QUALITY, subsampling=0)  # 4:4:4: small glyphs keep their colour
    if len(meta["objects"]) == 1:
        meta = {"label": meta["objects"][0]["label"], **meta}
    return {"__key__": key, "jpg": buffer.getvalue(), "txt": caption, "json": meta}


def train_samples(n: int, rng: np.random.Generator, spec: CanvasSpec = CanvasSpec()) -> Iterator[dict]:
    """n canvases of 1-3 different objects, captioned in varied wordings."""
    for index in range(n):
        count = int(rng.choice([1, 2, 3], p=OBJECT_COUNT_SHARES))
        labels = [int(v) for v in rng.choice(len(OBJECTS), size=count, replace=False)]
        canvas, meta = render(labels, rng, spec)
        yield _encode(f"train-{index:05d}", canvas, train_caption(meta, rng), meta)


def eval_samples(per_class: int, rng: np.random.Generator, spec: CanvasSpec = CanvasSpec()) -> Iterator[dict]:
    """per_class single-object canvases of every class, in shuffled order, captioned with the class."""
    for index, label in enumerate(rng.permutation(np.repeat(np.arange(len(OBJECTS)), per_class))):
        canvas, meta = render([int(label)], rng, spec)
        yield _encode(f"eval-{index:05d}", canvas, CLASS_NAMES[label], meta)


def retrieval_samples(n: int, rng: np.random.Generator, spec: CanvasSpec = CanvasSpec()) -> Iterator[dict]:
    """n canvases of 2-3 objects, each with a caption naming every object's colour, left to right;
    a canvas whose caption repeats an earlier one is drawn again."""
    seen: set[str] = set()
    index = 0
    while index < n:
        labels = [int(v) for v in rng.choice(len(OBJECTS), size=int(rng.integers(2, 4)), replace=False)]
        canvas, meta = render(labels, rng, spec)
        caption = full_caption(meta, rng)
        if caption in seen:
            continue
        seen.add(caption)
        yield _encode(f"retrieval-{index:05d}", canvas, caption, meta)
        index += 1


def _spec(out: Path, prefix: str, paths: list[str]) -> str:
    return f"{out}/{prefix}-{{000000..{len(paths) - 1:06d}}}.tar"


def make_object_shards(out_dir: str | Path, *, num_train: int = 8000, eval_per_class: int = 50,
                       num_retrieval: int = 1000, shards_train: int = 8, shards_eval: int = 2, seed: int = 0,
                       spec: CanvasSpec = CanvasSpec()) -> dict:
    """Write the train, eval and retrieval shards and dataset.json (class names, zero-shot
    prompts, the three shard specs) into out_dir. Each set draws from its own seeded stream, so
    one set's size does not change another's images."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_rng, eval_rng, retrieval_rng = (np.random.default_rng([seed, part]) for part in range(3))
    num_eval = eval_per_class * len(OBJECTS)
    sets = {}
    for prefix, samples, n, shards in (
            ("train", train_samples(num_train, train_rng, spec), num_train, shards_train),
            ("eval", eval_samples(eval_per_class, eval_rng, spec), num_eval, shards_eval),
            ("retrieval", retrieval_samples(num_retrieval, retrieval_rng, spec), num_retrieval, shards_eval)):
        paths = write_shards(samples, str(out / f"{prefix}-%06d.tar"), max_per_shard=max(1, -(-n // shards)))
        sets[prefix] = _spec(out, prefix, paths)
    info = {
        "name": "navit-clip-objects",
        "class_names": list(CLASS_NAMES),
        "templates": list(EVAL_TEMPLATES),
        "train_shards": sets["train"],
        "eval_shards": sets["eval"],
        "retrieval_shards": sets["retrieval"],
        "num_train": num_train,
        "num_eval": num_eval,
        "num_retrieval": num_retrieval,
        "seed": seed,
    }
    (out / "dataset.json").write_text(json.dumps(info, indent=2))
    return info
