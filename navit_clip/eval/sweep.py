"""NaViT's inference-time trade-off: the same model evaluated at several token budgets per image,
written as a table (Markdown and CSV) and a plot of quality and speed against tokens per image."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Callable, Sequence

from navit_clip.errors import InputError
from navit_clip.eval.report import metric_names


def parse_budgets(text: str) -> list[int]:
    try:
        budgets = sorted({int(b) for b in text.split(",") if b.strip()})
    except ValueError as exc:
        raise InputError(f"budgets must be comma-separated integers, got {text!r}") from exc
    if not budgets or budgets[0] < 1:
        raise InputError(f"budgets must be positive integers, got {text!r}")
    return budgets


def sweep(budgets: Sequence[int], evaluate: Callable[[int], dict]) -> list[dict]:
    """evaluate(budget) -> result, for each budget in turn."""
    return [evaluate(budget) for budget in budgets]


def sweep_rows(kind: str, results: list[dict]) -> list[dict]:
    names = metric_names(kind, results[0])
    return [{"max_tokens_per_image": r["max_tokens_per_image"], "tokens_per_image": round(r["tokens_per_image"], 2),
             **{k: r[k] for k in names}, "images_per_second": round(r["images_per_second"], 1)} for r in results]


def _cell(value) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4f}" if isinstance(value, float) and value <= 1 else str(value)


def write_sweep(kind: str, results: list[dict], out_dir: str | Path, title: str) -> dict[str, Path]:
    """sweep.csv, sweep.md and sweep.png in out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = sweep_rows(kind, results)
    columns = list(rows[0])
    with (out / "sweep.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"{title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row[c]) for c in columns) + " |" for row in rows]
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
    _plot(kind, rows, out / "sweep.png", title)
    return {"csv": out / "sweep.csv", "md": out / "sweep.md", "png": out / "sweep.png"}


def _plot(kind: str, rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    tokens = [r["tokens_per_image"] for r in rows]
    names = metric_names(kind, rows[0])
    if kind == "retrieval":
        names = [n for n in names if n.endswith(("@1", "@5"))] or names
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for name in names:
        values = [r[name] for r in rows]
        if all(v is not None for v in values):
            ax.plot(tokens, values, marker="o", label=name)
    ax.set_xlabel("tokens per image (mean, after fitting the budget)")
    ax.set_ylabel("accuracy / recall")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    speed = ax.twinx()
    speed.plot(tokens, [r["images_per_second"] for r in rows], color="grey", linestyle="--", marker="s",
               label="images/s (image tower)")
    speed.set_ylabel("images per second")
    handles = ax.get_legend_handles_labels()[0] + speed.get_legend_handles_labels()[0]
    fig.legend(handles=handles, loc="lower center", ncol=min(4, len(handles)), fontsize=7, frameon=False)
    ax.set_title(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path)
    plt.close(fig)
