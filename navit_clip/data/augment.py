"""Training crops that keep what NaViT is for: a random part of the image, at nearly its own
aspect ratio, then sized by the resolution policy like any other image.

Without them every epoch shows each image with the same pixels on the same patch grid, and a
small model learns the training pairs by heart instead of what the captions describe
(docs/quality.md has the figures). No flips: captions may say "left" and "right".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from navit_clip.data.shards import Sample


@dataclass(frozen=True)
class CropPolicy:
    """data.augment: a crop of area fraction U(min_area, 1), aspect ratio the image's times r,
    with log r uniform in ±log(max_aspect_change), placed uniformly; 1.0 and 1.0 turn it off."""

    min_area: float = 1.0
    max_aspect_change: float = 1.0

    @property
    def active(self) -> bool:
        return self.min_area < 1.0 or self.max_aspect_change > 1.0


def crop_box(width: int, height: int, policy: CropPolicy, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a random crop of a width×height image, at least 1×1 pixel."""
    area = rng.uniform(policy.min_area, 1.0)
    log_change = math.log(policy.max_aspect_change)
    change = math.exp(rng.uniform(-log_change, log_change))
    crop_w = min(width, max(1, round(width * math.sqrt(area * change))))
    crop_h = min(height, max(1, round(height * math.sqrt(area / change))))
    left = int(rng.integers(0, width - crop_w + 1))
    top = int(rng.integers(0, height - crop_h + 1))
    return left, top, left + crop_w, top + crop_h


def random_crop(sample: Sample, policy: CropPolicy, rng: np.random.Generator) -> Sample:
    """The sample with its image cropped (unchanged when the policy is off). An image decoded
    smaller than its file keeps its native size in proportion to the crop."""
    if not policy.active:
        return sample
    width, height = sample.image.size
    box = crop_box(width, height, policy, rng)
    native = None
    if sample.native_size is not None:
        native = (max(1, round(sample.native_size[0] * (box[2] - box[0]) / width)),
                  max(1, round(sample.native_size[1] * (box[3] - box[1]) / height)))
    return replace(sample, image=sample.image.crop(box), native_size=native)
