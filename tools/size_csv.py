"""The image-size distributions the benchmarks draw from: CSVs with columns width,height
(../shared/data/ holds COCO val2017, nocaps and LAION-Aesthetics)."""

from __future__ import annotations

import csv


def read_sizes(path: str) -> list[tuple[int, int]]:
    with open(path) as f:
        rows = list(csv.DictReader(f))
    if not rows or "width" not in rows[0] or "height" not in rows[0]:
        raise SystemExit(f"{path} must be a CSV with columns width,height")
    return [(int(r["width"]), int(r["height"])) for r in rows]
