"""Captions of any language end to end: make-shards from an image folder and a caption CSV,
train-tokenizer, a few training steps under each tokenizer, export, and retrieval evaluation
from the run and from the export after the original tokenizer file is gone."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.processes import TINY_TRAIN

pytestmark = pytest.mark.slow

CAPTIONS = ["빨간 사각형 하나", "蓝色的圆圈在白色背景上", "مثلث أخضر صغير", "a yellow star ⭐ on black 🌌",
            "Grüne Streifen, très jolies", "紫色の大きな四角形", "🔴🟢🔵 three dots", "صورة 🌍 世界 world 세계"]


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "-m", "navit_clip", *args], capture_output=True, text=True, timeout=900,
                          env={**env, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, f"navit-clip {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("multilingual")
    rng = np.random.default_rng(0)
    (root / "images").mkdir()
    with open(root / "captions.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "caption"])
        for i in range(48):
            size = (int(rng.integers(16, 64)), int(rng.integers(16, 64)))
            Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
            writer.writerow([f"{i}.png", f"{CAPTIONS[i % len(CAPTIONS)]} #{i}"])
    cli("make-shards", "--images", str(root / "images"), "--captions", str(root / "captions.csv"),
        "--out", str(root / "shards"), "--per-shard", "16", "--prefix", "ml")
    return str(root / "shards" / "ml-{000000..000002}.tar")


@pytest.mark.parametrize("tokenizer", ["clip-bpe", "sentencepiece"])
def test_multilingual_round_trip(shards, tokenizer, tmp_path):
    setting = "clip-bpe"
    if tokenizer == "sentencepiece":
        cli("train-tokenizer", "--shards", shards, "--vocab-size", "400", "--out", str(tmp_path / "tok"),
            "--model-type", "bpe")
        setting = str(tmp_path / "tok" / "tokenizer.model")
    run = tmp_path / "run"
    cli("train", *TINY_TRAIN, f"data.train_shards={shards}", f"data.eval_shards={shards}", f"train.out_dir={run}",
        "train.steps=3", f"model.text.tokenizer={setting}", "model.text.context_length=12")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in rows) and "truncated_captions" in rows[-1]
    cli("export", "--run", str(run), "--with-text", "--out", str(tmp_path / "export"))
    if tokenizer == "sentencepiece":
        (tmp_path / "tok" / "tokenizer.model").unlink()  # eval and export must use their own copies
        assert (run / "tokenizer.model").exists() and (tmp_path / "export" / "tokenizer.model").exists()
    results = []
    for model in (run, tmp_path / "export"):
        out = tmp_path / f"{model.name}.json"
        cli("eval", "--run", str(model), "--data", shards, "--task", "retrieval", "--out", str(out))
        results.append(json.loads(out.read_text()))
    for result in results:
        assert result["details"]["num_images"] == 48 and result["details"]["num_captions"] == 48
    # the export scores exactly as the run it came from
    assert results[0]["metrics"] == pytest.approx(results[1]["metrics"], abs=1e-6)
