"""`navit-clip compare`: run the schedule (compare/schedule.py) job by job under one progress bar,
record each finished job in OUT/state.json, and write the report from what is recorded."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from navit_clip.compare import openclip_row, recipes
from navit_clip.compare.report import write_report
from navit_clip.compare.schedule import Job, default_budgets, pending, plan
from navit_clip.compare.state import CompareState
from navit_clip.eval.datasets import EvalDataset, open_dataset
from navit_clip.eval.zeroshot import classify, resolve_templates


@dataclass
class Settings:
    shards: str
    eval_shards: str
    steps: int
    seeds: list[int]
    recipes: list[str]
    out: Path
    budgets: list[int] | None = None  # inference tokens per image (default ¼× to 2× the training budget)
    checkpoints: int = 4  # evaluation points at equal fractions of the training budget

    def recorded(self) -> dict:
        return {"shards": self.shards, "eval_shards": self.eval_shards, "steps": self.steps,
                "checkpoints": self.checkpoints, "seeds": self.seeds, "recipes": self.recipes, "budgets": self.budgets}


def compare(settings: Settings, progress: bool = True) -> dict:
    """Train and evaluate every recipe × seed not yet recorded; -> the report's paths and notes."""
    notes: list[str] = []
    chosen = list(settings.recipes)
    if "open_clip" in chosen and (missing := openclip_row.available()) is not None:
        notes.append(f"open_clip row skipped: {missing}")
        print(notes[-1])
        chosen.remove("open_clip")
    train_budgets = {recipe: recipes.training_budget(recipe) for recipe in chosen}
    budgets = settings.budgets or default_budgets(max(train_budgets.values(), default=1))
    state = CompareState(settings.out, settings.recorded())
    jobs = plan(chosen, settings.seeds, settings.steps, settings.checkpoints, train_budgets, budgets)
    todo = pending(jobs, state.done)
    bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc="compare", unit="job", disable=not progress,
               dynamic_ncols=True)
    dataset = None
    for job in todo:
        bar.set_postfix_str(job.id)
        if job.kind == "train":
            result = _train(job, settings)
        else:
            dataset = dataset or open_dataset(settings.eval_shards)
            result = _evaluate(job, settings, dataset)
        state.record(job, result)
        bar.update(1)
    bar.close()
    written = write_report(settings.out, state.evaluations(), state.trainings(), notes)
    return {"written": written, "notes": notes, "jobs": len(jobs), "ran": len(todo)}


def run_dir(settings: Settings, job: Job) -> Path:
    return settings.out / "runs" / job.run


def _train(job: Job, settings: Settings) -> dict:
    started = time.perf_counter()
    recipes.train_run(job.recipe, run_dir(settings, job), job.seed, settings.shards, settings.eval_shards,
                      settings.steps, settings.checkpoints)
    return {"kind": "train", "recipe": job.recipe, "seed": job.seed, "steps": settings.steps,
            "seconds": round(time.perf_counter() - started, 1)}


def _evaluate(job: Job, settings: Settings, dataset: EvalDataset) -> dict:
    folder = run_dir(settings, job)
    towers = recipes.load_checkpoint_towers(job.recipe, folder, job.step, settings.steps, settings.checkpoints)
    templates = resolve_templates(towers.cfg.eval.templates if towers.cfg is not None else None, dataset)
    result = classify(towers, dataset, templates, job.budget, progress=False)
    cfg = recipes.recipe_config(job.recipe)
    return {"kind": "eval", "recipe": job.recipe, "seed": job.seed, "step": job.step,
            "fraction": job.step / settings.steps, "budget": job.budget,
            "tokens_per_image": round(result["tokens_per_image"], 2), "acc1": result["acc1"], "acc5": result["acc5"],
            "mean_per_class_recall": result["mean_per_class_recall"],
            "train_tokens": job.step * recipes.tokens_per_step(job.recipe, cfg),
            "train_flops": recipes.logged_flops(folder, job.step)}


def parse_settings(shards: str | None, eval_shards: str | None, steps: int, seeds: str, recipes_text: str, out: str,
                   budgets: str | None = None, checkpoints: int = 4) -> Settings:
    """Settings from the command line's words; shards default to the navit recipe's."""
    from navit_clip.compare.schedule import parse_recipes, parse_seeds
    from navit_clip.eval.sweep import parse_budgets

    cfg = recipes.recipe_config("navit")
    return Settings(shards=shards or cfg.data.train_shards, eval_shards=eval_shards or cfg.data.eval_shards, steps=steps, seeds=parse_seeds(seeds),
                    recipes=parse_recipes(recipes_text), out=Path(out),
                    budgets=parse_budgets(budgets) if budgets else None, checkpoints=checkpoints)
