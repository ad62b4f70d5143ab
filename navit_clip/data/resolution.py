"""Choose each image's patch grid: native size when it fits the token budget, else scaled down.

The aspect ratio is kept (to within one patch) and images are never upscaled: that is NaViT's
point, a 4:1 banner stays a 4:1 banner and a thumbnail stays small and cheap. The one exception
is `square`, the fixed-resolution ViT recipe NaViT is compared against: every image becomes the
same R×R square (data/patches.py `square_view` crops or squashes it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from navit_clip.config import RESOLUTION_MODES, ResolutionConfig, ResolutionMode, SquareFit


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
    """How a size is picked per image.

    native: the native size, shrunk to fit max_tokens. sampled: a token budget drawn uniformly
    from [min_tokens, max_tokens] per image. side_uniform / side_normal: NaViT's sampling of the
    side length s (in patches, s*s tokens) between sqrt(min_tokens) and sqrt(max_tokens), uniform
    or normal with mean `side_mean` and spread `side_std` (fractions of that range) truncated to
    it; side_mean < 0.5 favours low resolutions. The aspect ratio is always kept and images are
    never upscaled past their native size. square: every image is the same grid of
    sqrt(max_tokens) patches a side (not capped at max_side: a learned table is interpolated), made
    by `square_fit` (crop: shorter side to R, then the centre R×R; squash: resized to R×R).

    With `skip_blank_below` > 0 an image's blank patches (flat canvas, borders) are not tokens,
    in training and at inference alike; its grid and every kept patch's place stay as they are.

    A per-step schedule: with `ramp_steps` > 0 the upper budget grows linearly from
    `ramp_start_tokens` at step 0 to max_tokens at step `ramp_steps` (low resolution first).

    All fields but patch_size and max_side (the model's) are the keys of `data.resolution`.
    """

    patch_size: int
    max_tokens: int
    max_side: int
    mode: ResolutionMode = "native"
    min_tokens: int = 1
    side_mean: float = 0.5
    side_std: float = 0.25
    ramp_start_tokens: int = 0
    ramp_steps: int = 0
    square_fit: SquareFit = "crop"
    skip_blank_below: int = 0  # patches whose pixel values span fewer levels are left out (patches.py)

    def max_tokens_at(self, step: int) -> int:
        if self.ramp_steps <= 0 or step >= self.ramp_steps or self.ramp_start_tokens <= 0:
            return self.max_tokens
        start = min(self.ramp_start_tokens, self.max_tokens)
        return max(1, int(round(start + (self.max_tokens - start) * step / self.ramp_steps)))

    def budget(self, rng: np.random.Generator | None, step: int = 0) -> int:
        """The token budget of one image at training step `step`."""
        top = self.max_tokens_at(step)
        if self.mode in ("native", "square"):
            return top
        if self.mode not in RESOLUTION_MODES:
            raise ValueError(f"unknown resolution mode {self.mode!r} (one of {', '.join(RESOLUTION_MODES)})")
        if rng is None:
            raise ValueError(f"{self.mode} resolution needs a random generator")
        low = min(self.min_tokens, top)
        if self.mode == "sampled":
            return int(rng.integers(low, top + 1))
        lo_side, hi_side = math.sqrt(low), math.sqrt(top)
        if self.mode == "side_uniform":
            u = float(rng.random())
        else:
            u = -1.0
            for _ in range(64):  # rejection sampling of the truncated normal
                u = float(rng.normal(self.side_mean, self.side_std))
                if 0.0 <= u <= 1.0:
                    break
            u = min(1.0, max(0.0, u))
        side = lo_side + u * (hi_side - lo_side)
        return max(1, min(top, int(round(side * side))))

    def grid_for(self, width: int, height: int, rng: np.random.Generator | None = None,
                 step: int = 0) -> tuple[int, int]:
        if self.mode == "square":
            side = math.isqrt(self.budget(rng, step))
            return side, side
        return fit_grid(width, height, self.patch_size, self.budget(rng, step), self.max_side)

    def draft_size(self, width: int, height: int) -> tuple[int, int]:
        """The pixel size of the largest grid the policy can pick for an image: JPEGs are decoded
        straight to a reduced size no smaller than it (square: the shorter side no smaller than R)."""
        if self.mode == "square":
            scale = min(1.0, math.isqrt(self.max_tokens) * self.patch_size / min(width, height))
            return math.ceil(width * scale), math.ceil(height * scale)
        rows, cols = fit_grid(width, height, self.patch_size, self.max_tokens, self.max_side)
        return cols * self.patch_size, rows * self.patch_size


def inference_policy(policy: ResolutionPolicy, max_tokens: int | None = None) -> ResolutionPolicy:
    """How evaluation and export size an image: a square model sees squares made the way it was
    trained; any other sees each image at its native size shrunk to the budget (never sampled)."""
    return replace(policy, mode=ImageSizing.of(policy).mode, ramp_steps=0, max_tokens=max_tokens or policy.max_tokens)


@dataclass(frozen=True)
class ImageSizing:
    """How a trained model turns a plain image into tokens at inference (evaluation, the export):
    the choices its training made, without the sampling. Kept with the model; `policy` makes the
    ResolutionPolicy for a budget."""

    mode: ResolutionMode = "native"  # native, or square for a square model
    square_fit: SquareFit = "crop"
    skip_blank_below: int = 0

    @classmethod
    def of(cls, resolution: ResolutionConfig | ResolutionPolicy) -> ImageSizing:
        """From training's data.resolution (a ResolutionConfig or ResolutionPolicy)."""
        return cls(mode="square" if resolution.mode == "square" else "native", square_fit=resolution.square_fit,
                   skip_blank_below=resolution.skip_blank_below)

    def policy(self, *, patch_size: int, max_side: int, max_tokens: int) -> ResolutionPolicy:
        return ResolutionPolicy(patch_size=patch_size, max_tokens=max_tokens, max_side=max_side, mode=self.mode,
                                square_fit=self.square_fit, skip_blank_below=self.skip_blank_below)
