"""Results as CLIP_benchmark writes them, so its tables and tools read ours:
`{"dataset", "model", "pretrained", "task", "metrics", "language"}`, plus our own `details`
(images, budget, tokens per image, speed, skipped samples, per-class recall)."""

from __future__ import annotations

import json
import math
from pathlib import Path

CLASSIFICATION_METRICS = ("acc1", "acc5", "mean_per_class_recall")
TASKS = {"classification": "zeroshot_classification", "retrieval": "zeroshot_retrieval", "linear_probe": "linear_probe"}


def metric_names(kind: str, result: dict) -> list[str]:
    if kind in ("classification", "linear_probe"):
        return list(CLASSIFICATION_METRICS)
    return [k for k in result if "_retrieval_recall@" in k]


def clip_benchmark_record(result: dict, *, kind: str, dataset: str, model: str, pretrained: str,
                          language: str = "en") -> dict:
    names = metric_names(kind, result)
    return {"dataset": dataset, "model": model, "pretrained": pretrained, "task": TASKS[kind],
            "metrics": {k: result[k] for k in names}, "language": language,
            "details": {k: v for k, v in result.items() if k not in names}}


def _finite(value):
    """JSON has no NaN or infinity: write null instead."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def write_json(path: str | Path, record: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_finite(record), indent=2))
    return path


def summary_line(kind: str, result: dict) -> str:
    if kind in ("classification", "linear_probe"):
        acc5 = "n/a" if result["acc5"] is None else f"{result['acc5']:.1%}"
        what = (f"linear probe (fit on {result['num_train_images']} images, weight decay {result['weight_decay']:g})"
                if kind == "linear_probe" else "zero-shot")
        return (f"{what} on {result['num_images']} images ({result['num_classes']} classes, chance "
                f"{result['chance_acc1']:.1%}) at {result['max_tokens_per_image']} tokens: acc1 {result['acc1']:.1%}  "
                f"acc5 {acc5}  mean per-class recall {result['mean_per_class_recall']:.1%}")
    parts = "  ".join(f"{k.replace('_retrieval_recall', '')} {v:.1%}" for k, v in result.items() if "recall@" in k)
    return (f"retrieval on {result['num_images']} images / {result['num_captions']} captions at "
            f"{result['max_tokens_per_image']} tokens (image = text->image, text = image->text): {parts}")
