"""Resize an image to its patch grid and cut it into P×P patches, keeping each patch's (row, col)."""

from __future__ import annotations

import numpy as np
from einops import rearrange
from PIL import Image


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


def unpatchify(patches: np.ndarray, rows: int, cols: int, patch_size: int, channels: int = 3) -> np.ndarray:
    """Inverse of `patchify`: [rows*cols, P*P*C] -> [rows*P, cols*P, C] image array."""
    return rearrange(patches, "(h w) (p1 p2 c) -> (h p1) (w p2) c", h=rows, w=cols, p1=patch_size,
                     p2=patch_size, c=channels)
