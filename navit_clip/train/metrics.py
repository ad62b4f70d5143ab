"""Metrics: one JSON line per logged step (the record), TensorBoard scalars (to watch a run) and
a PNG of the curves (to glance at a run directory without either)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

# JSONL fields drawn in the PNG, in this order.
PLOTTED = ("loss", "lr", "logit_scale", "images_per_s", "tokens_per_s", "padding", "mfu")


class JsonlLogger:
    def __init__(self, path: str | Path, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, **row: Any) -> None:
        if not self.enabled:
            return
        row = {"time": round(time.time(), 3), **row}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def truncate_jsonl(path: str | Path, last_step: int) -> int:
    """Drop rows logged after `last_step` (a run killed after its last checkpoint logged steps
    that the resumed run trains again); -> rows dropped. Rewritten atomically."""
    path = Path(path)
    if not path.exists():
        return 0
    rows = read_jsonl(path)
    kept = [r for r in rows if r.get("step", 0) <= last_step]
    if len(kept) < len(rows):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, path)
    return len(rows) - len(kept)


class TensorBoardLogger:
    """Numeric fields of each metrics row as TensorBoard scalars under train/."""

    def __init__(self, log_dir: str | Path, enabled: bool = True) -> None:
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(log_dir))

    def log(self, step: int, row: dict[str, Any]) -> None:
        if self.writer is None:
            return
        for key, value in row.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("step", "time"):
                self.writer.add_scalar(f"train/{key}", value, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def plot_curves(metrics_path: str | Path, out_path: str | Path) -> Path | None:
    """Draw the PLOTTED fields of a metrics file against the step into a PNG (atomically)."""
    rows = read_jsonl(metrics_path) if Path(metrics_path).exists() else []
    fields = [f for f in PLOTTED if any(isinstance(r.get(f), (int, float)) for r in rows)]
    if not fields:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(fields), 1, figsize=(7, 1.9 * len(fields)), sharex=True, squeeze=False)
    for ax, field in zip(axes[:, 0], fields):
        points = [(r["step"], r[field]) for r in rows if isinstance(r.get(field), (int, float))]
        ax.plot([p[0] for p in points], [p[1] for p in points], lw=1.2)
        ax.set_ylabel(field, fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    out_path = Path(out_path)
    tmp = out_path.with_name(out_path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, out_path)
    return out_path


def model_flops(sizes: dict[str, int], image_tokens: float, text_tokens: float) -> float:
    """Training FLOPs of a step: 6 × parameters × tokens per tower (forward 2, backward 4), the
    usual estimate; attention's own FLOPs are left out."""
    return 6.0 * (sizes["vision"] * image_tokens + sizes["text"] * text_tokens)
