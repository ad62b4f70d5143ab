"""The GPU check's results and its one Markdown report (tools/gpu_check.py)."""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STATUSES = ("passed", "failed", "skipped")

# (step, figure, lowest acceptable value, what it means): the performance goals of docs/gpu.md.
GOALS = (
    ("tower", "flex_vs_sdpa", 0.9, "flex packed >= 0.9x unmasked SDPA at the same L (bf16 fwd+bwd)"),
    ("tower", "b16_mfu", 0.45, "NaViT-B/16 forward+backward MFU >= 45%"),
)


@dataclass
class StepResult:
    name: str
    status: str  # one of STATUSES
    reason: str = ""
    figures: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status {self.status!r} is not one of {STATUSES}")


def goals(results: list[StepResult]) -> list[tuple[str, str, str]]:
    """(goal, measured, verdict) for each goal: met, missed, or not measured."""
    figures = {r.name: r.figures for r in results}
    out = []
    for step, key, lowest, text in GOALS:
        value = figures.get(step, {}).get(key)
        if value is None:
            out.append((text, "-", "not measured"))
        else:
            out.append((text, format_value(value), "met" if value >= lowest else "MISSED"))
    return out


def format_value(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    return f"{value:.4g}"


def environment() -> list[str]:
    """One line each: host, Python, torch and the GPU (when torch imports)."""
    lines = [f"host: {platform.node()} ({platform.machine()}), Python {platform.python_version()}"]
    try:
        import torch

        lines.append(f"torch {torch.__version__}, CUDA {torch.version.cuda}")
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            lines.append(f"GPU: {props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs")
    except ImportError as exc:
        lines.append(f"torch does not import: {exc}")
    return lines


def render_report(results: list[StepResult], goal_rows: list[tuple[str, str, str]], dry_reason: str = "",
                  env_lines: list[str] | None = None) -> str:
    failed = [r.name for r in results if r.status == "failed"]
    verdict = f"FAILED: {', '.join(failed)}" if failed else "dry run: nothing measured" if dry_reason else "passed"
    lines = ["# navit-clip GPU check", "", f"{time.strftime('%Y-%m-%d %H:%M:%S')}; result: **{verdict}**", ""]
    if dry_reason:
        lines += [f"Dry mode: {dry_reason}.", ""]
    lines += [f"- {line}" for line in (env_lines if env_lines is not None else environment())] + [""]
    lines += ["| step | status | seconds | note |", "| --- | --- | --- | --- |"]
    lines += [f"| {r.name} | {r.status} | {r.seconds:.1f} | {escape(r.reason)} |" for r in results]
    lines += ["", "## Goals", "", "| goal | measured | verdict |", "| --- | --- | --- |"]
    lines += [f"| {text} | {value} | {verdict} |" for text, value, verdict in goal_rows]
    for r in results:
        if r.figures:
            lines += ["", f"## {r.name}", "", "| figure | value |", "| --- | --- |"]
            lines += [f"| {key} | {escape(format_value(value))} |" for key, value in r.figures.items()]
    return "\n".join(lines) + "\n"


def escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def write_report(path: Path, results: list[StepResult], goal_rows: list[tuple[str, str, str]],
                 dry_reason: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_report(results, goal_rows, dry_reason))
    return path
