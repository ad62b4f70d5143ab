"""Token dropping: keep a random subset of each training image's patches (NaViT, section 3.3).

Dropping lets more images share a sequence and, with a random rate, spreads token counts so the
packer fills sequences tighter. The image keeps its full `grid` and each kept patch its true
(row, col), so the model still knows where every patch came from. Evaluation never drops.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from navit_clip.config import DROP_KINDS, DropKind
from navit_clip.data.packing import PatchedImage


@dataclass(frozen=True)
class DropPolicy:
    """Per-image drop rate.

    none: keep everything. constant: `rate`. beta: a rate drawn from Beta(beta_a, beta_b), scaled
    to [0, max_rate]. resolution: the rate grows linearly with the image's token count, from 0 at
    `min_tokens` to `rate` at `max_tokens` (large images lose more, small ones stay whole).
    The rate is multiplied by a linear ramp from `ramp_start` at step 0 to 1 at `ramp_steps`, so
    a run can start without dropping and reach the full rate later (or the reverse).

    All fields but min_tokens and max_tokens (data.resolution's) are the keys of `data.drop`.
    """

    kind: DropKind = "none"
    rate: float = 0.0
    beta_a: float = 1.0
    beta_b: float = 1.0
    max_rate: float = 0.5
    min_tokens: int = 1
    max_tokens: int = 256
    ramp_start: float = 1.0
    ramp_steps: int = 0

    def __post_init__(self) -> None:
        if self.kind not in DROP_KINDS:
            raise ValueError(f"unknown token dropping kind {self.kind!r} (one of {', '.join(DROP_KINDS)})")
        if not 0.0 <= self.rate < 1.0 or not 0.0 <= self.max_rate < 1.0:
            raise ValueError(f"drop rates must be in [0, 1), got rate={self.rate}, max_rate={self.max_rate}")
        if self.kind == "beta" and (self.beta_a <= 0 or self.beta_b <= 0):
            raise ValueError(f"Beta parameters must be > 0, got a={self.beta_a}, b={self.beta_b}")

    def scale_at(self, step: int) -> float:
        if self.ramp_steps <= 0 or step >= self.ramp_steps:
            return 1.0
        return self.ramp_start + (1.0 - self.ramp_start) * step / self.ramp_steps

    def rate_for(self, num_tokens: int, rng: np.random.Generator, step: int = 0) -> float:
        """The drop rate of one image with `num_tokens` patches at training step `step`."""
        if self.kind == "none":
            return 0.0
        if self.kind == "constant":
            rate = self.rate
        elif self.kind == "beta":
            rate = float(rng.beta(self.beta_a, self.beta_b)) * self.max_rate
        else:
            span = max(1, self.max_tokens - self.min_tokens)
            rate = self.rate * min(1.0, max(0.0, (num_tokens - self.min_tokens) / span))
        return min(0.99, rate * self.scale_at(step))


def drop_tokens(image: PatchedImage, rate: float, rng: np.random.Generator) -> PatchedImage:
    """Keep round(N * (1 - rate)) patches (at least one), chosen at random, in their original order."""
    n = image.num_tokens
    keep = max(1, int(round(n * (1.0 - rate))))
    if keep >= n:
        return image
    kept = np.sort(rng.choice(n, size=keep, replace=False))
    return replace(image, patches=image.patches[kept], coords=image.coords[kept])


def apply_dropping(image: PatchedImage, policy: DropPolicy, rng: np.random.Generator, step: int = 0) -> PatchedImage:
    if policy.kind == "none":
        return image
    return drop_tokens(image, policy.rate_for(image.num_tokens, rng, step), rng)
