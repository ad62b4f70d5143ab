"""Linear warmup then cosine decay, as a multiplier of the base learning rate, and how it continues
when a resumed run trains toward a different `train.steps` (`train.extend`)."""

from __future__ import annotations

import math


class WarmupCosine:
    """(step+1)/warmup during warmup, then a cosine from 1 to min_ratio over the decay's progress.

    The progress runs linearly from `anchor_progress` at `anchor_step` to 1 at `total_steps`; a
    fresh schedule anchors at (warmup_steps, 0). A callable object rather than a function because
    LambdaLR saves a callable object's attributes with its state, which DeepSpeed checkpoints: a
    changed horizon travels with every later checkpoint of the run."""

    def __init__(self, total_steps: int, warmup_steps: int, min_ratio: float = 0.0) -> None:
        self.total_steps, self.warmup_steps, self.min_ratio = total_steps, warmup_steps, min_ratio
        self.anchor_step, self.anchor_progress = warmup_steps, 0.0

    def progress(self, step: int) -> float:
        """How far the decay has gone at `step`: 0 at its start, 1 at the end of training."""
        span = max(1, self.total_steps - self.anchor_step)
        return min(1.0, self.anchor_progress + (1.0 - self.anchor_progress) * (step - self.anchor_step) / span)

    def __call__(self, step: int) -> float:
        if self.warmup_steps > 0 and step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * self.progress(step)))

    def continue_to(self, step: int, total_steps: int) -> None:
        """Train toward `total_steps` from `step` on without a jump: the multiplier at `step` stays,
        and the rest of the decay is stretched (or squeezed) to end at the new horizon. Before the
        decay has started (still in warmup) only the horizon moves."""
        if step > self.anchor_step:
            self.anchor_progress, self.anchor_step = self.progress(step), step
        self.total_steps = total_steps


def warmup_cosine(step: int, *, total_steps: int, warmup_steps: int, min_ratio: float = 0.0) -> float:
    """Multiplier for `step` (0-based) of a fresh schedule."""
    return WarmupCosine(total_steps, warmup_steps, min_ratio)(step)


def continue_schedule(scheduler, step: int, total_steps: int) -> None:  # noqa: ANN001 - a torch LambdaLR
    """After loading a checkpoint at `step`: if the run now trains toward a different horizon than
    the restored schedule (allowed by train.extend, checked before loading), continue it there."""
    schedule = scheduler.lr_lambdas[0]
    if isinstance(schedule, WarmupCosine) and schedule.total_steps != total_steps:
        schedule.continue_to(step, total_steps)


def restore_horizon(scheduler, saved_config: dict | None) -> None:  # noqa: ANN001 - a torch LambdaLR
    """After loading a checkpoint: the schedule continues toward the train.steps it was trained
    toward (its config's). A checkpoint written before the schedule was saved with it restores
    none of the schedule's attributes, which would leave the configured horizon in place."""
    steps = (saved_config or {}).get("train", {}).get("steps")
    schedule = scheduler.lr_lambdas[0]
    if isinstance(schedule, WarmupCosine) and steps is not None:
        schedule.total_steps = steps
