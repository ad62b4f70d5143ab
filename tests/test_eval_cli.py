"""`navit-clip eval` from an exported encoder (image + text): a budget sweep on a caption CSV
writes CLIP_benchmark JSON per budget, a table and a plot; a wrong model path is refused."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_image
from navit_clip.config import ModelConfig, TextConfig, VisionConfig
from navit_clip.eval.datasets import open_dataset
from navit_clip.eval.retrieval import retrieve
from navit_clip.eval.towers import load_towers
from navit_clip.export import export_image_encoder
from navit_clip.model.clip import NaViTCLIP

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "navit_clip", *args], capture_output=True, text=True,
                          timeout=900, cwd=REPO)


@pytest.mark.slow
def test_sweep_from_export_on_csv(tmp_path):
    torch.manual_seed(0)
    model = NaViTCLIP(ModelConfig(vision=VisionConfig(patch_size=4, width=32, depth=1, heads=2, max_grid_side=16),
                                  text=TextConfig(width=32, depth=1, heads=2, context_length=16), embed_dim=16))
    export = export_image_encoder(model.eval(), tmp_path / "export", max_tokens_per_image=24, seq_len=48,
                                  max_images=4, with_text=True)
    rows = ["path,caption"]
    for i, (w, h) in enumerate([(40, 16), (16, 48), (24, 24), (64, 32), (20, 28), (48, 48)]):
        make_tiny_image(w, h, "RGB", i).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,picture number {i}")
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")

    proc = cli("eval", "--run", str(export), "--data", str(tmp_path / "pairs.csv"), "--budgets", "16,8",
               "--out", str(tmp_path / "sweep"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "sweep" / "retrieval_16tokens.json").read_text())
    assert {"dataset", "model", "pretrained", "task", "metrics", "language"} <= set(record)
    assert record["task"] == "zeroshot_retrieval" and record["dataset"] == "pairs"
    assert set(record["metrics"]) == {f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)}
    expected = retrieve(load_towers(export), open_dataset(str(tmp_path / "pairs.csv")), 16, progress=False)
    for key, value in record["metrics"].items():
        assert value == pytest.approx(expected[key])
    with (tmp_path / "sweep" / "sweep.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [int(r["max_tokens_per_image"]) for r in table] == [8, 16]
    assert float(table[0]["tokens_per_image"]) <= 8 < float(table[1]["tokens_per_image"]) <= 16
    assert "| max_tokens_per_image |" in (tmp_path / "sweep" / "sweep.md").read_text()
    assert (tmp_path / "sweep" / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    bad = cli("eval", "--run", str(tmp_path), "--data", str(tmp_path / "pairs.csv"))
    assert bad.returncode == 2 and "neither a training run" in bad.stderr, bad.stderr[-2000:]
    no_data = cli("eval", "--run", str(export))
    assert no_data.returncode == 2 and "--data" in no_data.stderr


def test_run_dir_default_data_override_and_json(tmp_path, tiny_shards):
    """A training run directory (checkpoint in DeepSpeed's file layout): its eval shards by default,
    eval.max_tokens_per_image overrides the budget, RUN/eval/zeroshot.json in CLIP_benchmark's format."""
    from navit_clip.config import Config, config_to_dict
    from navit_clip.eval.run import run_eval

    cfg = Config()
    cfg.model = ModelConfig(vision=VisionConfig(patch_size=8, width=32, depth=1, heads=2, max_grid_side=32),
                            text=TextConfig(width=32, depth=1, heads=2, context_length=16), embed_dim=16)
    cfg.data.seq_len, cfg.data.max_images, cfg.data.resolution.max_tokens = 96, 5, 40
    cfg.data.eval_shards = tiny_shards.spec
    torch.manual_seed(0)
    model = NaViTCLIP(cfg.validate().model)
    (tiny_shards.directory / "dataset.json").write_text(json.dumps(
        {"class_names": [f"class{i}" for i in range(7)], "templates": ["a photo of {}."]}))
    ckpt = tmp_path / "run" / "checkpoints" / "step5"
    ckpt.mkdir(parents=True)
    torch.save({"module": model.state_dict(), "step": 5, "config": config_to_dict(cfg)},
               ckpt / "mp_rank_00_model_states.pt")
    (ckpt.parent / "latest").write_text("step5")

    result = run_eval(tmp_path / "run", overrides=["eval.max_tokens_per_image=8"], progress=False)
    record = json.loads((tmp_path / "run" / "eval" / "zeroshot.json").read_text())
    assert record["task"] == "zeroshot_classification" and record["pretrained"].endswith("@step5")
    assert record["details"]["max_tokens_per_image"] == 8 and record["details"]["num_images"] == tiny_shards.count
    assert record["details"]["tokens_per_image"] <= 8
    assert record["metrics"] == {k: result[k] for k in ("acc1", "acc5", "mean_per_class_recall")}
