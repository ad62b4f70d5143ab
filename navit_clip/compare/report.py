"""The comparison written out: results.csv (one row per evaluation), table.md (zero-shot acc1 as
mean ± standard deviation over seeds, during training and at each inference budget) and two plots:
accuracy against training compute (the mean, with the seeds' range shaded) and accuracy of the
final models against inference tokens per image.

Training compute is the cumulative training FLOPs of each checkpoint (navit-clip's runs log them,
open_clip_train's are counted by compare/compute.py), when every evaluation has them; otherwise
the image tokens (packed positions or square patches) seen so far."""

from __future__ import annotations

import csv
import statistics
from collections import defaultdict
from pathlib import Path

from navit_clip.compare.schedule import RECIPES

COLUMNS = ("recipe", "seed", "step", "fraction", "budget", "tokens_per_image", "acc1", "acc5", "mean_per_class_recall",
           "train_tokens", "train_flops")


def spread(values: list[float]) -> tuple[float, float, float, float]:
    """(mean, standard deviation, min, max) over seeds; one seed has no deviation."""
    return (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, min(values), max(values))


def compute_axis(evals: list[dict]) -> str:
    return "train_flops" if evals and all(e.get("train_flops") for e in evals) else "train_tokens"


def checkpoint(e: dict) -> float:
    """An evaluation's place in its run (1.0: the final model). Recipes trained to one FLOPs budget
    stop at different steps, so checkpoints line up by fraction, not by step."""
    return round(e["fraction"], 6)


def during_training(evals: list[dict]) -> dict[str, dict[float, list[dict]]]:
    """recipe -> checkpoint fraction -> evaluations over seeds, at that recipe's training token budget."""
    by_recipe: dict[str, list[dict]] = defaultdict(list)
    for e in evals:
        by_recipe[e["recipe"]].append(e)
    table: dict[str, dict[float, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for recipe, rows in by_recipe.items():
        train_budget = _train_budget(rows)
        for e in rows:
            if e["budget"] == train_budget:
                table[recipe][checkpoint(e)].append(e)
    return table


def at_inference(evals: list[dict]) -> dict[str, dict[int, list[dict]]]:
    """recipe -> inference budget -> evaluations of the final models over seeds."""
    table: dict[str, dict[int, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for e in evals:
        if checkpoint(e) == 1.0:
            table[e["recipe"]][e["budget"]].append(e)
    return table


def _column(fraction: float, rows: list[dict]) -> str:
    """A checkpoint's heading: its step when every recipe is there at the same step."""
    steps = {e["step"] for e in rows}
    return f"step {steps.pop()}" if len(steps) == 1 else f"{fraction:.0%} of the run"


def _train_budget(evals: list[dict]) -> int:
    """The budget every checkpoint of one recipe was evaluated at (the one present at most steps)."""
    steps_by_budget: dict[int, set] = defaultdict(set)
    for e in evals:
        steps_by_budget[e["budget"]].add(e["step"])
    return max(steps_by_budget, key=lambda b: (len(steps_by_budget[b]), -b), default=0)


def _budget_of(by_step: dict[float, list[dict]]) -> int:
    return next(rows[0]["budget"] for rows in by_step.values() if rows)


def _cell(rows: list[dict]) -> str:
    mean, std, _, _ = spread([r["acc1"] for r in rows])
    return f"{mean:.1%} ± {std:.1%} (n={len(rows)})"


def markdown(evals: list[dict], trainings: list[dict], notes: list[str]) -> str:
    lines = ["# Zero-shot acc1 (mean ± std over seeds)", ""]
    lines += [f"_{note}_" for note in notes] + ([""] if notes else [])
    training = during_training(evals)
    points = sorted({f for by_fraction in training.values() for f in by_fraction})
    headings = [_column(f, [e for by_fraction in training.values() for e in by_fraction.get(f, [])]) for f in points]
    lines += ["## During training (each recipe at its training tokens per image)", "",
              "| recipe | " + " | ".join(headings) + " |", "|---|" + "---|" * len(points)]
    lines += [f"| {recipe} ({_budget_of(by_fraction)} tokens) | "
              + " | ".join(_cell(by_fraction[f]) if f in by_fraction else "n/a" for f in points) + " |"
              for recipe, by_fraction in training.items()]
    steps_of = {recipe: max(e["step"] for rows in by_fraction.values() for e in rows)
                for recipe, by_fraction in training.items()}
    if len(set(steps_of.values())) > 1:
        lines += ["", "Steps of each run: " + ", ".join(f"{r} {n}" for r, n in steps_of.items()) + "."]
    inference = at_inference(evals)
    budgets = sorted({b for by_budget in inference.values() for b in by_budget})
    lines += ["", "## Final models at other inference budgets (max tokens per image)", "",
              "| recipe | " + " | ".join(f"{b} tokens" for b in budgets) + " |", "|---|" + "---|" * len(budgets)]
    lines += [f"| {recipe} | " + " | ".join(_cell(by_b[b]) if b in by_b else "n/a" for b in budgets) + " |"
              for recipe, by_b in inference.items()]
    seconds: dict[str, list[float]] = defaultdict(list)
    for t in trainings:
        seconds[t["recipe"]].append(t["seconds"])
    lines += ["", "## Training time per run (this machine)", "", "| recipe | seconds (mean) | runs |", "|---|---|---|"]
    lines += [f"| {r} | {statistics.fmean(s):.0f} | {len(s)} |" for r, s in seconds.items()]
    return "\n".join(lines) + "\n"


def write_report(out: str | Path, evals: list[dict], trainings: list[dict], notes: list[str]) -> dict[str, Path]:
    """table.md, results.csv and the two PNGs in `out`; -> their paths."""
    from navit_clip.compare.plots import plot_compute, plot_inference

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    order = {recipe: i for i, recipe in enumerate(RECIPES)}
    evals = sorted(evals, key=lambda e: (order.get(e["recipe"], len(order)), e["seed"], e["step"], e["budget"]))
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(evals)
    (out / "table.md").write_text(markdown(evals, trainings, notes))
    written = {"table": out / "table.md", "csv": out / "results.csv"}
    if evals:
        written["compute_plot"] = plot_compute(evals, out / "accuracy_vs_compute.png")
        written["inference_plot"] = plot_inference(evals, out / "accuracy_vs_inference_tokens.png")
    return written
