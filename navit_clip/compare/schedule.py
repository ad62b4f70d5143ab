"""The comparison's schedule, as data: which runs to train and which evaluations to make of them,
each job with a stable id so that a rerun can tell finished work from the rest. No I/O here.

For every recipe and seed: one training job, then zero-shot evaluations of the checkpoints at
equal fractions of the training budget (at that recipe's training tokens per image), then of the
final model at each inference budget."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from navit_clip.errors import InputError

RECIPES = ("navit", "square", "open_clip")
DEFAULT_BUDGET_FACTORS = (0.25, 0.5, 1.0, 2.0)  # inference tokens per image, × the training budget


@dataclass(frozen=True)
class Job:
    kind: str  # "train" | "eval"
    recipe: str
    seed: int
    step: int = 0  # eval: the checkpoint's step
    budget: int = 0  # eval: tokens per image

    @property
    def run(self) -> str:
        """The training run this job belongs to (its folder name under OUT/runs)."""
        return f"{self.recipe}-seed{self.seed}"

    @property
    def id(self) -> str:
        return self.run if self.kind == "train" else f"{self.run}@step{self.step}@{self.budget}tokens"


def parse_recipes(text: str) -> list[str]:
    recipes = [r.strip() for r in text.split(",") if r.strip()]
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown or not recipes:
        raise InputError(f"--recipes: unknown recipe(s) {unknown} (choose from {', '.join(RECIPES)})")
    return list(dict.fromkeys(recipes))


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError as exc:
        raise InputError(f"--seeds must be comma-separated integers, got {text!r}") from exc
    if not seeds:
        raise InputError("--seeds names no seed")
    return list(dict.fromkeys(seeds))


def checkpoint_steps(steps: int, checkpoints: int) -> list[int]:
    """Steps at 1/n, 2/n, ..., n/n of the budget; steps must divide evenly (open_clip_train
    checkpoints once per epoch, so its epochs are these fractions)."""
    if steps < 1 or checkpoints < 1:
        raise InputError(f"--steps ({steps}) and the number of checkpoints ({checkpoints}) must be positive")
    if steps % checkpoints:
        raise InputError(f"--steps {steps} must be a multiple of the {checkpoints} evaluation checkpoints")
    return [steps * i // checkpoints for i in range(1, checkpoints + 1)]


def default_budgets(train_budget: int) -> list[int]:
    """¼× to 2× the training tokens per image."""
    return sorted({max(1, round(train_budget * f)) for f in DEFAULT_BUDGET_FACTORS})


def plan(recipes: Sequence[str], seeds: Iterable[int], steps: Mapping[str, int], checkpoints: int,
         train_budgets: Mapping[str, int], budgets: Sequence[int]) -> list[Job]:
    """Every job of the comparison in the order it runs: a run's evaluations right after it.
    `steps`: each recipe's training steps (the same for all, or each its share of a FLOPs budget);
    `train_budgets`: each recipe's training tokens per image, where its checkpoints are evaluated."""
    jobs: list[Job] = []
    for recipe in recipes:
        train_budget, final = train_budgets[recipe], steps[recipe]
        for seed in seeds:
            jobs.append(Job("train", recipe, seed))
            jobs += [Job("eval", recipe, seed, step, train_budget) for step in checkpoint_steps(final, checkpoints)]
            jobs += [Job("eval", recipe, seed, final, b) for b in sorted(set(budgets)) if b != train_budget]
    return jobs


def pending(jobs: Sequence[Job], done: Iterable[str]) -> list[Job]:
    """The jobs not yet recorded as finished, in order."""
    finished = set(done)
    return [job for job in jobs if job.id not in finished]
