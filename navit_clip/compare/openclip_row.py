"""open_clip's own trainer as a row of the comparison: a model config at the sizes of a navit-clip
Config, the `open_clip_train` command line for the same shards, steps, images per step and
optimizer settings, and the run's checkpoints read back for zero-shot evaluation.

The square side is the one whose patch grid holds the training token budget (64 tokens at patch 8:
64×64 pixels); the run checkpoints once per "epoch", so the epochs are the evaluation points."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from navit_clip.config import Config
from navit_clip.errors import InputError

MODEL_NAME = "navit-compare-vit"  # the config file's stem: open_clip registers models by file name
RUN_NAME = "openclip"  # open_clip_train's --name: checkpoints go to RUN_DIR/openclip/checkpoints


def available() -> str | None:
    """None when open_clip_train can be imported, else why not (one line)."""
    try:
        import open_clip_train.main  # noqa: F401
    except Exception as exc:  # any import failure means the row cannot run
        return f"open_clip_train is not available ({type(exc).__name__}: {exc})"
    return None


def square_side(cfg: Config) -> int:
    """Pixels per side of the square whose patch grid holds data.resolution.max_tokens."""
    return math.isqrt(cfg.data.resolution.max_tokens) * cfg.model.vision.patch_size


def model_config(cfg: Config) -> dict:
    """open_clip's CLIP config at the widths, depths and sizes of `cfg` (CLIP BPE vocabulary)."""
    vision, text = cfg.model.vision, cfg.model.text
    return {
        "embed_dim": cfg.model.embed_dim,
        "vision_cfg": {"image_size": square_side(cfg), "layers": vision.depth, "width": vision.width,
                       "head_width": vision.width // vision.heads, "patch_size": vision.patch_size},
        "text_cfg": {"context_length": text.context_length, "vocab_size": 49408, "width": text.width,
                     "heads": text.heads, "layers": text.depth},
    }


def write_model_config(cfg: Config, run_dir: str | Path) -> Path:
    path = Path(run_dir) / f"{MODEL_NAME}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(model_config(cfg), indent=2) + "\n")
    return path


def images_per_step(cfg: Config) -> int:
    """The same tokens per step as the packed recipe: its packed tokens over the square's tokens."""
    tokens = math.isqrt(cfg.data.resolution.max_tokens) ** 2
    return cfg.data.seq_len * cfg.data.sequences_per_batch * cfg.train.grad_accum_steps // tokens


def train_args(cfg: Config, run_dir: str | Path, shards: str, steps: int, checkpoints: int, seed: int) -> list[str]:
    """open_clip_train.main arguments: `checkpoints` epochs of steps/checkpoints steps each, one
    checkpoint per epoch, resumed from the latest one when the run folder already has one."""
    if steps % checkpoints:
        raise InputError(f"--steps {steps} must be a multiple of the {checkpoints} evaluation checkpoints "
                          "(open_clip_train checkpoints once per epoch)")
    batch = images_per_step(cfg)
    return [
        "--train-data", shards, "--dataset-type", "webdataset", "--dataset-resampled",
        "--train-num-samples", str(steps // checkpoints * batch), "--epochs", str(checkpoints),
        "--batch-size", str(batch), "--workers", str(max(1, cfg.data.num_workers)),
        "--model", MODEL_NAME, "--lr", str(cfg.optim.lr), "--wd", str(cfg.optim.weight_decay),
        "--warmup", str(cfg.optim.warmup_steps), "--precision", "fp32", "--device", "cpu",
        "--seed", str(seed), "--logs", str(run_dir), "--name", RUN_NAME, "--resume", "latest",
        "--save-frequency", "1", "--zeroshot-frequency", "0", "--val-frequency", "0",
        "--log-every-n-steps", "10",
    ]


def checkpoint_path(run_dir: str | Path, epoch: int) -> Path:
    return Path(run_dir) / RUN_NAME / "checkpoints" / f"epoch_{epoch}.pt"


def train(cfg: Config, run_dir: str | Path, shards: str, steps: int, checkpoints: int, seed: int) -> Path:
    """Run open_clip_train in a child process (it sets up its own logging and device); -> the
    final checkpoint. A folder with earlier epochs resumes from the latest."""
    run_dir = Path(run_dir)
    config = write_model_config(cfg, run_dir)
    command = [sys.executable, "-m", "navit_clip.compare.openclip_launch", str(config), "--",
               *train_args(cfg, run_dir, shards, steps, checkpoints, seed)]
    log = run_dir / "train.log"
    with log.open("a") as out:
        proc = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "WANDB_MODE": "disabled"})
    final = checkpoint_path(run_dir, checkpoints)
    if proc.returncode != 0 or not final.exists():
        raise RuntimeError(f"open_clip_train failed (exit {proc.returncode}); see {log}")
    return final
