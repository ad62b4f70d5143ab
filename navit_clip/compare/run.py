"""`navit-clip compare`: run the schedule (compare/schedule.py) under one progress bar, record each
finished job in OUT/state.json, and write the report from what is recorded.

Trainings run as child processes, `jobs` at a time (each child gets its share of the cores
unless OMP_NUM_THREADS is set); this process evaluates each run's checkpoints as soon as its
training is recorded, and is the only writer of state.json."""

from __future__ import annotations

import math
import os
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from navit_clip.compare import compute, openclip_row, recipes
from navit_clip.compare.report import write_report
from navit_clip.compare.schedule import Job, default_budgets, pending, plan
from navit_clip.compare.state import CompareState
from navit_clip.errors import InputError
from navit_clip.eval.datasets import EvalDataset, open_dataset
from navit_clip.eval.zeroshot import classify, resolve_templates

DEFAULT_STEPS = 1000


@dataclass
class Settings:
    shards: str
    eval_shards: str
    steps: int | None  # training steps of every run; None: each recipe's share of the `flops` budget
    seeds: list[int]
    recipes: list[str]
    out: Path
    budgets: list[int] | None = None  # inference tokens per image (default ¼× to 2× the training budget)
    checkpoints: int = 4  # evaluation points at equal fractions of the training budget
    jobs: int = 1  # trainings at a time
    overrides: dict[str, list[str]] = field(default_factory=dict)  # recipe -> its config's "key=value" changes
    flops: float | None = None  # a training FLOPs budget for every run: each recipe's steps then come from it

    def recorded(self) -> dict:
        return {"shards": self.shards, "eval_shards": self.eval_shards, "steps": self.steps,
                "checkpoints": self.checkpoints, "seeds": self.seeds, "recipes": self.recipes, "budgets": self.budgets,
                "overrides": self.overrides, "flops": self.flops}


def compare(settings: Settings, progress: bool = True) -> dict:
    """Train and evaluate every recipe × seed not yet recorded; -> the report's paths and notes."""
    notes: list[str] = []
    chosen = list(settings.recipes)
    if "open_clip" in chosen and (missing := openclip_row.available()) is not None:
        notes.append(f"open_clip row skipped: {missing}")
        print(notes[-1])
        chosen.remove("open_clip")
    notes += [f"{recipe} recipe with {', '.join(changes)}" for recipe, changes in settings.overrides.items()]
    train_budgets = {recipe: recipes.training_budget(recipe, settings.overrides.get(recipe)) for recipe in chosen}
    budgets = settings.budgets or default_budgets(max(train_budgets.values(), default=1))
    state = CompareState(settings.out, settings.recorded())
    state.keep_steps(run_steps(settings, [recipe for recipe in chosen if recipe not in state.run_steps]))
    steps = {recipe: state.run_steps[recipe] for recipe in chosen}
    if settings.flops is not None:
        notes.append(f"equal training compute: {settings.flops:.3g} FLOPs a run, so "
                     + ", ".join(f"{recipe} {n} steps" for recipe, n in steps.items()))
    jobs = plan(chosen, settings.seeds, steps, settings.checkpoints, train_budgets, budgets)
    todo = pending(jobs, state.done)
    bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc="compare", unit="job", disable=not progress,
               dynamic_ncols=True)
    evals = [job for job in todo if job.kind == "eval"]
    trainings = [job for job in todo if job.kind == "train"]
    untrained = {job.run for job in trainings}
    dataset: EvalDataset | None = None  # opened on the first evaluation

    def evaluate(run: str) -> None:
        nonlocal dataset
        for job in [job for job in evals if job.run == run]:
            bar.set_postfix_str(job.id)
            dataset = dataset or open_dataset(settings.eval_shards)
            state.record(job, _evaluate(job, settings, dataset, steps[job.recipe]))
            bar.update(1)

    for run in dict.fromkeys(job.run for job in evals if job.run not in untrained):  # trained before
        evaluate(run)

    def trained(job: Job, result: dict) -> None:
        state.record(job, result)
        bar.update(1)
        evaluate(job.run)

    train_runs(trainings, settings, trained, steps)
    bar.close()
    written = write_report(settings.out, state.evaluations(), state.trainings(), notes)
    return {"written": written, "notes": notes, "jobs": len(jobs), "ran": len(todo)}


def run_steps(settings: Settings, chosen: list[str]) -> dict[str, int]:
    """Each recipe's training steps: --steps for all, or the steps that spend the --flops budget."""
    if settings.flops is None:
        return {recipe: settings.steps for recipe in chosen}
    return {recipe: compute.steps_for_budget(settings.flops, _step_flops(recipe, settings), settings.checkpoints)
            for recipe in chosen}


def _step_flops(recipe: str, settings: Settings) -> float:
    return compute.step_flops(recipe, recipes.recipe_config(recipe, settings.overrides.get(recipe)), settings.shards)


def train_runs(trainings: list[Job], settings: Settings, trained: Callable[[Job, dict], None],
               steps: dict[str, int]) -> None:
    """Train `trainings` (each to its recipe's `steps`), settings.jobs at a time, each in a child process; call trained(job, result)
    in this thread as each one finishes (its slot is given to the next training after that call). A
    failed training starts no other, lets the running ones finish and be recorded, then is raised."""
    if not trainings:
        return
    share_cores(settings.jobs)
    failure: BaseException | None = None
    with ThreadPoolExecutor(max_workers=settings.jobs) as pool:
        waiting, running = list(trainings), {}
        while waiting or running:
            while waiting and len(running) < settings.jobs:
                job = waiting.pop(0)
                running[pool.submit(_train, job, settings, steps[job.recipe])] = job
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                job = running.pop(future)
                if future.exception() is not None:
                    waiting.clear()
                    failure = failure or future.exception()
                else:
                    trained(job, future.result())
    if failure is not None:
        raise failure


def share_cores(jobs: int) -> None:
    """With several trainings at once, each child takes cores / jobs threads (not all of them)."""
    if jobs > 1 and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))


def run_dir(settings: Settings, job: Job) -> Path:
    return settings.out / "runs" / job.run


def _train(job: Job, settings: Settings, steps: int) -> dict:
    started = time.perf_counter()
    recipes.train_run(job.recipe, run_dir(settings, job), job.seed, settings.shards, settings.eval_shards,
                      steps, settings.checkpoints, settings.overrides.get(job.recipe))
    return {"kind": "train", "recipe": job.recipe, "seed": job.seed, "steps": steps,
            "seconds": round(time.perf_counter() - started, 1)}


def _evaluate(job: Job, settings: Settings, dataset: EvalDataset, steps: int) -> dict:
    folder = run_dir(settings, job)
    towers = recipes.load_checkpoint_towers(job.recipe, folder, job.step, steps, settings.checkpoints)
    templates = resolve_templates(towers.cfg.eval.templates if towers.cfg is not None else None, dataset)
    result = classify(towers, dataset, templates, job.budget, progress=False)
    cfg = recipes.recipe_config(job.recipe, settings.overrides.get(job.recipe))
    return {"kind": "eval", "recipe": job.recipe, "seed": job.seed, "step": job.step,
            "fraction": job.step / steps, "budget": job.budget,
            "tokens_per_image": round(result["tokens_per_image"], 2), "acc1": result["acc1"], "acc5": result["acc5"],
            "mean_per_class_recall": result["mean_per_class_recall"],
            "train_tokens": job.step * recipes.tokens_per_step(job.recipe, cfg),
            "train_flops": _train_flops(job, folder, cfg)}


def _train_flops(job: Job, folder: Path, cfg) -> float | None:
    """Cumulative training FLOPs at the job's checkpoint: as the run logged them, or for
    open_clip_train (which logs none) its fixed step's count times the steps."""
    if job.recipe == "open_clip":
        return job.step * compute.openclip_step_flops(cfg)
    return recipes.logged_flops(folder, job.step)


def parse_settings(shards: str | None, eval_shards: str | None, steps: int | None, seeds: str, recipes_text: str, out: str,
                   budgets: str | None = None, checkpoints: int = 4, jobs: int = 1,
                   changes: list[str] | None = None, flops: float | None = None) -> Settings:
    """Settings from the command line's words; shards default to the navit recipe's."""
    from navit_clip.compare.schedule import parse_recipes, parse_seeds
    from navit_clip.eval.sweep import parse_budgets

    cfg = recipes.recipe_config("navit")
    chosen = parse_recipes(recipes_text)
    if steps is not None and flops is not None:
        raise InputError("give --steps (the same steps for every run) or --flops (the same compute), not both")
    steps = None if flops is not None else (DEFAULT_STEPS if steps is None else steps)
    return Settings(shards=shards or cfg.data.train_shards, eval_shards=eval_shards or cfg.data.eval_shards, steps=steps, seeds=parse_seeds(seeds),
                    recipes=chosen, out=Path(out),
                    budgets=parse_budgets(budgets) if budgets else None, checkpoints=checkpoints,
                    jobs=parse_jobs(jobs), overrides=parse_overrides(changes or [], chosen), flops=parse_flops(flops))


def parse_overrides(changes: list[str], chosen: list[str]) -> dict[str, list[str]]:
    """--set RECIPE:KEY=VALUE words -> {recipe: ["KEY=VALUE", ...]}, each checked against the
    recipe's config now (a bad key or value is a ConfigError naming it before anything trains)."""
    overrides: dict[str, list[str]] = {}
    for change in changes:
        recipe, colon, setting = change.partition(":")
        if not colon or "=" not in setting:
            raise InputError(f"--set {change!r}: expected RECIPE:KEY=VALUE, e.g. navit:data.sequences_per_batch=8")
        if recipe not in chosen:
            raise InputError(f"--set {change!r}: {recipe!r} is not one of the recipes compared ({', '.join(chosen)})")
        overrides.setdefault(recipe, []).append(setting)
    for recipe, settings in overrides.items():
        recipes.recipe_config(recipe, settings)
    return overrides


def parse_flops(flops: float | None) -> float | None:
    if flops is not None and not (flops > 0 and math.isfinite(flops)):
        raise InputError(f"--flops must be a positive number of training FLOPs (e.g. 1.2e13), got {flops}")
    return flops


def parse_jobs(jobs: int) -> int:
    if jobs < 1:
        raise InputError(f"--jobs must be at least 1, got {jobs}")
    return jobs
