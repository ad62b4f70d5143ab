"""The comparison's two figures (matplotlib, files only)."""

from __future__ import annotations

from pathlib import Path

from navit_clip.compare.report import at_inference, compute_axis, during_training, spread

AXIS_LABELS = {"train_flops": "training FLOPs (both towers, forward + backward)",
               "train_tokens": "training image tokens (per-step tokens × steps)"}


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    return plt, fig, ax


def _finish(plt, fig, ax, path: Path, xlabel: str, title: str) -> Path:
    ax.set_xlabel(xlabel)
    ax.set_ylabel("zero-shot acc1")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_compute(evals: list[dict], path: Path) -> Path:
    """acc1 against training compute: the mean over seeds, the seeds' min..max shaded."""
    axis = compute_axis(evals)
    plt, fig, ax = _figure()
    for recipe, by_fraction in during_training(evals).items():
        points = sorted(by_fraction)
        x = [spread([r[axis] for r in by_fraction[f]])[0] for f in points]
        stats = [spread([r["acc1"] for r in by_fraction[f]]) for f in points]
        ax.plot(x, [m for m, _, _, _ in stats], marker="o", label=recipe)
        ax.fill_between(x, [lo for _, _, lo, _ in stats], [hi for _, _, _, hi in stats], alpha=0.2)
    return _finish(plt, fig, ax, path, AXIS_LABELS[axis], "zero-shot acc1 during training (range over seeds)")


def plot_inference(evals: list[dict], path: Path) -> Path:
    """acc1 of the final models against the mean tokens per image they were given."""
    plt, fig, ax = _figure()
    for recipe, by_budget in at_inference(evals).items():
        budgets = sorted(by_budget)
        x = [spread([r["tokens_per_image"] for r in by_budget[b]])[0] for b in budgets]
        stats = [spread([r["acc1"] for r in by_budget[b]]) for b in budgets]
        ax.errorbar(x, [m for m, _, _, _ in stats], yerr=[s for _, s, _, _ in stats], marker="o", capsize=3,
                    label=recipe)
    return _finish(plt, fig, ax, path, "inference tokens per image (mean)", "final models at other token budgets")
