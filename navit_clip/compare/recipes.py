"""How each recipe of the comparison is trained and read back: navit-clip's own recipes (a config
in configs/compare/, trained by `navit-clip train` in a child process) and open_clip's trainer.
Both checkpoint at the same steps and report the training compute spent by each checkpoint."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

from navit_clip.compare import openclip_row
from navit_clip.config import CONFIG_DIR, Config, load_config
from navit_clip.eval.towers import Towers
from navit_clip.train.metrics import read_jsonl

OWN_RECIPES = {"navit": "navit.yaml", "square": "square.yaml"}
# open_clip_train runs the square recipe's sizes: its square side, batch and towers come from square.yaml.
RECIPE_CONFIGS = {**OWN_RECIPES, "open_clip": "square.yaml"}


def recipe_config(recipe: str, overrides: list[str] | None = None) -> Config:
    """The Config of a recipe of the comparison (for open_clip_train: the sizes it is given)."""
    return load_config(str(CONFIG_DIR / "compare" / RECIPE_CONFIGS[recipe]), overrides or [])


def training_budget(recipe: str, overrides: list[str] | None = None) -> int:
    """Tokens per image the recipe trains at (the most, for NaViT's sampled resolutions)."""
    return recipe_config(recipe, overrides).data.resolution.max_tokens


def tokens_per_step(recipe: str, cfg: Config) -> int:
    """Image tokens per optimizer step, padding included (packed positions, or square patches)."""
    if recipe == "open_clip":
        side = openclip_row.square_side(cfg) // cfg.model.vision.patch_size
        return openclip_row.images_per_step(cfg) * side * side
    return cfg.data.seq_len * cfg.data.sequences_per_batch * cfg.train.grad_accum_steps


def train_run(recipe: str, run_dir: Path, seed: int, shards: str, eval_shards: str, steps: int,
              checkpoints: int, overrides: list[str] | None = None) -> None:
    """Train (or finish training) one run; a folder with checkpoints resumes from the latest.
    `overrides` ("key=value") change the recipe's config, as on `navit-clip train`'s command line."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if recipe == "open_clip":
        openclip_row.train(recipe_config(recipe, overrides), run_dir, shards, steps, checkpoints, seed)
        return
    command = [sys.executable, "-m", "navit_clip", "train", "--config", str(CONFIG_DIR / "compare" / OWN_RECIPES[recipe]),
               f"data.train_shards={shards}", f"data.eval_shards={eval_shards}", f"train.out_dir={run_dir}",
               f"train.steps={steps}", f"train.seed={seed}", f"train.ckpt_every={steps // checkpoints}",
               f"train.keep_checkpoints={checkpoints}",
               f"train.log_every={math.gcd(steps // checkpoints, 10)}",  # a metrics row at every checkpoint
               *(overrides or [])]
    log = run_dir / "train.log"
    with log.open("a") as out:
        proc = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"training {run_dir.name} failed (exit {proc.returncode}); see {log}")


def load_checkpoint_towers(recipe: str, run_dir: Path, step: int, steps: int, checkpoints: int) -> Towers:
    """Evaluation towers of the checkpoint at `step`."""
    if recipe == "open_clip":
        from navit_clip.compare.openclip_towers import openclip_towers

        epoch = step * checkpoints // steps
        return openclip_towers(run_dir / f"{openclip_row.MODEL_NAME}.json", openclip_row.checkpoint_path(run_dir, epoch),
                               step=step)
    from navit_clip.eval.towers import load_towers

    return load_towers(run_dir, tag=f"step{step}")


def logged_flops(run_dir: Path, step: int) -> float | None:
    """Cumulative training FLOPs the run logged at `step`, when it logs them."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return None
    rows = [r for r in read_jsonl(path) if r.get("step") == step and isinstance(r.get("flops"), (int, float))]
    return float(rows[-1]["flops"]) if rows else None
