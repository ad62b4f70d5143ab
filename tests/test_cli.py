"""The command line itself: a user error is one line and exit status 2, a bug keeps its traceback,
and only the commands that build a DeepSpeed engine import DeepSpeed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_image
from navit_clip import cli
from navit_clip.config import Config, ModelConfig, TextConfig, VisionConfig, config_to_dict
from navit_clip.errors import MissingInputError
from navit_clip.model.clip import NaViTCLIP

REPO = Path(__file__).resolve().parents[1]


def fake_run(root: Path, eval_shards: str) -> Path:
    """A training run directory holding one checkpoint in DeepSpeed's file layout."""
    cfg = Config()
    cfg.model = ModelConfig(vision=VisionConfig(patch_size=8, width=32, depth=1, heads=2, max_grid_side=32),
                            text=TextConfig(width=32, depth=1, heads=2, context_length=16), embed_dim=16)
    cfg.data.seq_len, cfg.data.max_images, cfg.data.resolution.max_tokens = 96, 5, 40
    cfg.data.eval_shards = eval_shards
    torch.manual_seed(0)
    model = NaViTCLIP(cfg.validate().model)
    ckpt = root / "checkpoints" / "step3"
    ckpt.mkdir(parents=True)
    torch.save({"module": model.state_dict(), "step": 3, "config": config_to_dict(cfg)},
               ckpt / "mp_rank_00_model_states.pt")
    (ckpt.parent / "latest").write_text("step3")
    return root


def test_user_error_is_one_line_and_a_bug_keeps_its_traceback(monkeypatch, capsys):
    def missing(**_):
        raise MissingInputError("run dir nowhere does not exist")

    monkeypatch.setattr(cli, "export_command", missing)
    assert cli.main(["export", "--run", "nowhere"]) == 2
    assert capsys.readouterr().err == "navit-clip export: error: run dir nowhere does not exist\n"

    def bug(**_):
        raise ValueError("a bug, not the user's fault")

    monkeypatch.setattr(cli, "export_command", bug)
    with pytest.raises(ValueError, match="a bug"):
        cli.main(["export", "--run", "nowhere"])


def test_commands_without_an_engine_do_not_import_deepspeed(tmp_path, tiny_shards):
    run = fake_run(tmp_path / "run", tiny_shards.spec)
    folder = tmp_path / "folder"  # an image folder: classes, but no prompt templates
    for label in ("cat", "dog"):
        (folder / label).mkdir(parents=True)
        make_tiny_image(24, 16, "RGB", len(label)).save(folder / label / "0.png")
    (tmp_path / "caps.csv").write_text("file,caption\n0.png,a cat\n")
    script = f"""
import sys
from navit_clip.cli import main
for argv in ({['export', '--help']!r}, {['eval', '--help']!r}, {['make-shards', '--help']!r}):
    try:
        main(argv)
    except SystemExit:
        pass
assert main(["eval", "--run", {str(run)!r}, "--data", {str(folder)!r}]) == 2
assert main(["export", "--run", {str(run)!r}, "--out", {str(tmp_path / 'export')!r}]) == 0
assert main(["make-shards", "--images", {str(folder / 'cat')!r}, "--captions", {str(tmp_path / 'caps.csv')!r},
             "--out", {str(tmp_path / 'shards')!r}]) == 0
assert main(["pack-shards", "--shards", {tiny_shards.spec!r}, "--out", {str(tmp_path / 'packed')!r},
             "model.vision.patch_size=8", "data.seq_len=96", "data.max_images=5"]) == 0
leaked = [m for m in sys.modules if m.startswith("deepspeed")]
assert not leaked, leaked[:5]
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "accelerator" not in proc.stderr, proc.stderr[-3000:]
    # the image folder has no templates of its own: the message names the flag that supplies them
    assert "pass --templates imagenet" in proc.stderr, proc.stderr[-3000:]
    assert json.loads((tmp_path / "export" / "config.json").read_text())["embed_dim"] == 16
    assert (tmp_path / "shards").is_dir() and list((tmp_path / "packed").glob("packed-*.tar"))
