"""Resize an image to its patch grid and cut it into P×P patches, keeping each patch's (row, col).

`patch_image` is the one path from an image to a packable example, shared by the training
stream, evaluation and the exported encoder.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from einops import rearrange
from PIL import Image

from navit_clip.data.packing import PatchedImage
from navit_clip.data.resolution import ResolutionPolicy

if TYPE_CHECKING:
    from collections import Counter

    from navit_clip.data.shards import Sample
    from navit_clip.data.text import CaptionTokenizer

NO_TEXT = np.zeros(1, dtype=np.int64)  # the caption of an image embedded without one


def patchify(image: Image.Image, rows: int, cols: int, patch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """-> patches [rows*cols, P*P*C] uint8 in (p1 p2 c) order, coords [rows*cols, 2] int64 (row, col)."""
    size = (cols * patch_size, rows * patch_size)
    if image.size != size:
        image = image.resize(size, Image.Resampling.BICUBIC, reducing_gap=None)
    pixels = np.asarray(image, dtype=np.uint8)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    patches = rearrange(pixels, "(h p1) (w p2) c -> (h w) (p1 p2 c)", p1=patch_size, p2=patch_size)
    coords = np.stack(np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij"), axis=-1).reshape(-1, 2)
    return np.ascontiguousarray(patches), coords.astype(np.int64)


def non_blank(patches: np.ndarray, below: int) -> np.ndarray:
    """[N] bool: patches whose pixel values span at least `below` levels (max - min over the patch's
    pixels and channels). A blank canvas, a flat border or letterboxing says nothing about the
    image and costs a token each; an image with nothing else keeps its most varied patch."""
    spread = patches.max(axis=1).astype(np.int16) - patches.min(axis=1)
    keep = spread >= below
    if not keep.any():
        keep[int(spread.argmax())] = True
    return keep


def unpatchify(patches: np.ndarray, rows: int, cols: int, patch_size: int, channels: int = 3) -> np.ndarray:
    """Inverse of `patchify`: [rows*cols, P*P*C] -> [rows*P, cols*P, C] image array."""
    return rearrange(patches, "(h w) (p1 p2 c) -> (h p1) (w p2) c", h=rows, w=cols, p1=patch_size,
                     p2=patch_size, c=channels)


def square_view(image: Image.Image, side: int, fit: str = "crop") -> Image.Image:
    """The side×side square the fixed-resolution ViT recipe sees, as open_clip's preprocessing
    makes it: crop: shorter side resized to `side` (bicubic), then the centre square (torchvision
    Resize + CenterCrop, same rounding); squash: resized to side×side, aspect ratio lost."""
    if fit == "squash":
        return image.resize((side, side), Image.Resampling.BICUBIC, reducing_gap=None)
    width, height = image.size
    size = (side, int(side * height / width)) if width <= height else (int(side * width / height), side)
    if image.size != size:
        image = image.resize(size, Image.Resampling.BICUBIC, reducing_gap=None)
    left, top = int(round((size[0] - side) / 2.0)), int(round((size[1] - side) / 2.0))
    return image.crop((left, top, left + side, top + side))


def patch_image(key: str, image: Image.Image, policy: ResolutionPolicy, text: np.ndarray = NO_TEXT,
                rng: np.random.Generator | None = None, step: int = 0,
                native_size: tuple[int, int] | None = None) -> PatchedImage:
    """Size an image by the policy (from its native size if it was decoded smaller), cut it into
    RGB patches and leave out the blank ones if the policy says so."""
    rows, cols = policy.grid_for(*(native_size or image.size), rng=rng, step=step)
    if image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    if policy.mode == "square":
        image = square_view(image, rows * policy.patch_size, policy.square_fit)
    patches, coords = patchify(image, rows, cols, policy.patch_size)
    if policy.skip_blank_below > 0:  # a grey patch spans as many levels in one channel as in three
        keep = non_blank(patches, policy.skip_blank_below)
        patches, coords = patches[keep], coords[keep]
    if image.mode == "L":  # resized as one channel: the same pixels as its RGB copy, a third of the work
        patches = np.repeat(patches[:, :, None], 3, axis=2).reshape(len(patches), -1)
    return PatchedImage(key=key, patches=patches, coords=coords, grid=(rows, cols), text=text)


def to_patched(sample: Sample, policy: ResolutionPolicy, tokenizer: CaptionTokenizer,
               rng: np.random.Generator | None, step: int = 0, counts: Counter | None = None) -> PatchedImage:
    """A decoded training sample, sized, patchified and with its caption tokenized; a caption cut
    to the context length is counted in counts["truncated_captions"]."""
    text, truncated = tokenizer.encode_counted([sample.caption])
    if counts is not None:
        counts["truncated_captions"] += truncated
    return patch_image(sample.key, sample.image, policy, text[0], rng, step, sample.native_size)
