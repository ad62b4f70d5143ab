"""Choose each image's patch grid: native size when it fits the token budget, else scaled down.

The aspect ratio is kept (to within one patch) and images are never upscaled: that is NaViT's
point, a 4:1 banner stays a 4:1 banner and a thumbnail stays small and cheap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def fit_grid(width: int, height: int, patch_size: int, max_tokens: int, max_side: int) -> tuple[int, int]:
    """(rows, cols) of the largest grid with rows*cols <= max_tokens, both sides <= max_side,
    at most the native size, and the image's aspect ratio."""
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if max_tokens < 1 or max_side < 1:
        raise ValueError(f"max_tokens and max_side must be >= 1, got {max_tokens}, {max_side}")
    native_rows, native_cols = height / patch_size, width / patch_size
    scale = min(1.0, math.sqrt(max_tokens / (native_rows * native_cols)),
                max_side / native_rows, max_side / native_cols)
    rows = min(max_side, max(1, round(native_rows * scale)))
    cols = min(max_side, max(1, round(native_cols * scale)))
    while rows * cols > max_tokens:  # rounding up may overshoot: trim the side that is too long
        if rows > 1 and (rows * width >= cols * height or cols == 1):
            rows -= 1
        else:
            cols -= 1
    return rows, cols


@dataclass(frozen=True)
class ResolutionPolicy:
    """How a size is picked per image: `native` (up to max_tokens) or `sampled` (a budget drawn
    uniformly from [min_tokens, max_tokens] per image, NaViT's resolution sampling)."""

    patch_size: int
    max_tokens: int
    max_side: int
    mode: str = "native"
    min_tokens: int = 1

    def grid_for(self, width: int, height: int, rng: np.random.Generator | None = None) -> tuple[int, int]:
        budget = self.max_tokens
        if self.mode == "sampled":
            if rng is None:
                raise ValueError("sampled resolution needs a random generator")
            budget = int(rng.integers(self.min_tokens, self.max_tokens + 1))
        elif self.mode != "native":
            raise ValueError(f"unknown resolution mode {self.mode!r} (native or sampled)")
        return fit_grid(width, height, self.patch_size, budget, self.max_side)
