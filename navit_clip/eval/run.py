"""`navit-clip eval`: one model (training run or export), one dataset (any layout), one task
(zero-shot classification, retrieval or a linear probe), one token budget or a sweep over several;
results written in CLIP_benchmark's JSON format."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from navit_clip.errors import InputError
from navit_clip.eval.datasets import open_dataset
from navit_clip.eval.embed import check_budget
from navit_clip.eval.linear_probe import linear_probe, probe_training_data
from navit_clip.eval.report import clip_benchmark_record, summary_line, write_json
from navit_clip.eval.retrieval import retrieve
from navit_clip.eval.sweep import sweep, write_sweep
from navit_clip.eval.towers import load_towers
from navit_clip.eval.zeroshot import classify, resolve_templates

RESULT_FILES = {"classification": "zeroshot.json", "retrieval": "retrieval.json", "linear_probe": "linear_probe.json"}


def run_eval(model: str | Path, data: str | None = None, *, tag: str | None = None, task: str = "auto",
             templates: str | None = None, budgets: Sequence[int] | None = None, split: str = "test",
             classnames: str | None = None, out: str | Path | None = None, overrides: Sequence[str] = (),
             device: str | None = None, progress: bool = True, train_data: str | None = None) -> dict:
    """Evaluate and write the result (one budget: a JSON file; several: a folder with one JSON per
    budget and the sweep table and plot). Returns the result of the last budget, with `record`
    (the CLIP_benchmark record) and `written` (paths). `train_data`: the linear probe's training
    images (default: see `probe_training_data`)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    towers = load_towers(model, tag, device, list(overrides))
    cfg = towers.cfg
    default_budget = (cfg.eval.max_tokens_per_image if cfg is not None else 0) or towers.max_tokens_per_image
    budgets = list(budgets or [default_budget])
    for budget in budgets:  # all of them before the first is evaluated
        check_budget(towers, budget)
    given = data is not None
    if data is None:
        if cfg is None:
            raise InputError(f"{model} is an export: name the evaluation data (--data)")
        data = cfg.data.eval_shards
    dataset = open_dataset(str(data), split=split, class_names_file=classnames)
    kind = dataset.kind if task == "auto" else task
    if kind not in RESULT_FILES:
        raise InputError(f"unknown task {task!r} (auto, {', '.join(RESULT_FILES)})")
    if kind != "retrieval" and dataset.kind != "classification":
        raise InputError(f"{data} has no class names: it can only be used for retrieval")
    if kind == "classification":
        prompts = resolve_templates(templates or (cfg.eval.templates if cfg is not None else None), dataset)
        evaluate = lambda budget: classify(towers, dataset, prompts, budget, progress)  # noqa: E731
    elif kind == "linear_probe":
        train = probe_training_data(towers, str(data), given, train_data, classnames)
        evaluate = lambda budget: linear_probe(towers, train, dataset, budget, progress)  # noqa: E731
    else:
        evaluate = lambda budget: retrieve(towers, dataset, budget, progress=progress)  # noqa: E731
    results = sweep(budgets, evaluate)
    pretrained = f"{model}@step{towers.step}" if towers.step is not None else str(model)

    def record(result: dict) -> dict:
        result = {**result, "data": str(data), "step": towers.step}
        return clip_benchmark_record(result, kind=kind, dataset=dataset.name, model="navit-clip", pretrained=pretrained)

    base = Path(model) / "eval"
    written: dict[str, Path] = {}
    if len(budgets) == 1:
        written["json"] = write_json(Path(out) if out else base / RESULT_FILES[kind], record(results[0]))
    else:
        folder = Path(out) if out else base / f"sweep_{kind}"
        for result in results:
            written[f"json@{result['max_tokens_per_image']}"] = write_json(
                folder / f"{kind}_{result['max_tokens_per_image']}tokens.json", record(result))
        title = f"{kind} on {dataset.name}, {pretrained}"
        written.update(write_sweep(kind, results, folder, title))
    final = results[-1]
    return {**final, "step": towers.step, "data": str(data), "task": kind, "record": record(final),
            "sweep": results if len(results) > 1 else None, "written": written,
            "summary": [summary_line(kind, r) for r in results]}
