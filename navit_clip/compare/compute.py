"""Training compute per step of each recipe of the comparison, and the steps that spend a FLOPs budget.

navit-clip's recipes: the mean of train/flops.py's count over the first batches of the recipe's own
training stream (packing and caption lengths vary a little from batch to batch; the runs log the
exact count). open_clip_train logs no FLOPs, and its step is the same every time: one square image
per row with a class token, the text tower at the full context. Counted with the same rules as
train/flops.py; tests/test_compare_compute.py checks it against torch's FlopCounterMode on
open_clip's own model."""

from __future__ import annotations

import itertools
import statistics
from dataclasses import replace

from navit_clip.compare import openclip_row
from navit_clip.config import Config
from navit_clip.errors import InputError
from navit_clip.train.flops import BACKWARD_PER_FORWARD, attention, blocks, linear, text_forward

SAMPLED_BATCHES = 20  # batches of a recipe's stream whose mean FLOPs stand for its step


def openclip_step_flops(cfg: Config) -> float:
    """Forward and backward FLOPs of one open_clip_train step at the sizes compare gives it."""
    vision, text = cfg.model.vision, cfg.model.text
    images = openclip_row.images_per_step(cfg)
    patches = (openclip_row.square_side(cfg) // vision.patch_size) ** 2
    tokens = patches + 1  # the class token
    image = (linear(patches, vision.patch_size ** 2 * vision.channels, vision.width)
             + blocks(tokens, vision.width, vision.mlp_ratio, vision.depth)
             + attention(tokens ** 2, vision.width, vision.depth)
             + linear(1, vision.width, cfg.model.embed_dim))
    captions = text_forward(text, cfg.model.embed_dim, images, text.context_length)
    return (1.0 + BACKWARD_PER_FORWARD) * (images * image + captions)


def measured_step_flops(cfg: Config, shards: str, batches: int = SAMPLED_BATCHES) -> float:
    """Mean training FLOPs of one optimizer step over the first `batches` batches of the recipe's stream."""
    from navit_clip.data.loader import make_loader
    from navit_clip.data.spec import stream_spec
    from navit_clip.train.flops import training_flops

    spec = replace(stream_spec(cfg), shards=shards)
    counts = [training_flops(cfg.model, batch) for batch in itertools.islice(iter(make_loader(spec)), batches)]
    if not counts:
        raise InputError(f"no training batch could be read from {shards}")
    return statistics.fmean(counts) * cfg.train.grad_accum_steps


def step_flops(recipe: str, cfg: Config, shards: str) -> float:
    """Training FLOPs of one step of `recipe` with config `cfg` on `shards`."""
    return openclip_step_flops(cfg) if recipe == "open_clip" else measured_step_flops(cfg, shards)


def steps_for_budget(budget: float, per_step: float, checkpoints: int) -> int:
    """The steps whose FLOPs come nearest `budget`, a multiple of `checkpoints` (at least one each)."""
    return max(1, round(budget / per_step / checkpoints)) * checkpoints
