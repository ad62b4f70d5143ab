"""`navit-clip compare --flops`: each recipe's training FLOPs per step (open_clip_train's against
torch's FlopCounterMode on open_clip's own model), the steps that spend one budget, a schedule and
a report whose recipes stop at different steps, and the command end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from navit_clip.compare import compute, openclip_row
from navit_clip.compare.report import at_inference, markdown
from navit_clip.compare.schedule import Job, plan
from navit_clip.compare.state import CompareState
from navit_clip.config import CONFIG_DIR, load_config
from navit_clip.errors import InputError

SQUARE = CONFIG_DIR / "compare" / "square.yaml"


def test_openclip_step_flops_equal_the_counter_on_open_clips_model(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    cfg = load_config(SQUARE)
    path = openclip_row.write_model_config(cfg, tmp_path)
    open_clip.add_model_config(path)
    model = open_clip.create_model(path.stem)
    images = openclip_row.images_per_step(cfg)
    side = openclip_row.square_side(cfg)
    pixels, text = torch.randn(images, 3, side, side), torch.randint(1, 1000, (images, cfg.model.text.context_length))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:  # attention as matrix products
        image, caption, _ = model(pixels, text)
        (image.sum() + caption.sum()).backward()
    # within 1%: the patch embedding's backward needs no gradient of the pixels, which we count
    assert compute.openclip_step_flops(cfg) == pytest.approx(counter.get_total_flops(), rel=0.01)


@pytest.mark.parametrize("budget, per_step, checkpoints, steps", [
    (1000.0, 10.0, 4, 100),  # exact
    (1000.0, 30.0, 4, 32),  # 33.3 steps: the nearest multiple of 4
    (1000.0, 26.0, 4, 40),  # 38.5 steps: rounds up
    (10.0, 30.0, 4, 4),  # less than a step: one step for each checkpoint
])
def test_steps_for_budget_are_the_nearest_multiple_of_the_checkpoints(budget, per_step, checkpoints, steps):
    assert compute.steps_for_budget(budget, per_step, checkpoints) == steps


def test_plan_gives_each_recipe_its_own_steps():
    jobs = plan(["navit", "square"], [0], steps={"navit": 8, "square": 4}, checkpoints=2,
                train_budgets={"navit": 64, "square": 64}, budgets=[32, 64])
    assert [(j.recipe, j.step, j.budget) for j in jobs if j.kind == "eval"] == [
        ("navit", 4, 64), ("navit", 8, 64), ("navit", 8, 32), ("square", 2, 64), ("square", 4, 64), ("square", 4, 32)]


def _eval(recipe: str, step: int, steps: int, budget: int, acc: float) -> dict:
    return {"recipe": recipe, "seed": 0, "step": step, "fraction": step / steps, "budget": budget,
            "tokens_per_image": float(budget), "acc1": acc, "acc5": 1.0, "mean_per_class_recall": acc,
            "train_tokens": step, "train_flops": 1.0e9 * step}


def test_report_lines_up_recipes_of_different_steps_by_their_place_in_the_run():
    evals = [_eval("navit", 50, 100, 64, 0.4), _eval("navit", 100, 100, 64, 0.6), _eval("navit", 100, 100, 32, 0.5),
             _eval("square", 30, 60, 64, 0.2), _eval("square", 60, 60, 64, 0.3), _eval("square", 60, 60, 32, 0.1)]
    text = markdown(evals, [], [])
    assert "| recipe | 50% of the run | 100% of the run |" in text
    assert "| navit (64 tokens) | 40.0% ± 0.0% (n=1) | 60.0% ± 0.0% (n=1) |" in text
    assert "| square (64 tokens) | 20.0% ± 0.0% (n=1) | 30.0% ± 0.0% (n=1) |" in text
    assert "Steps of each run: navit 100, square 60." in text
    final = at_inference(evals)  # each recipe's own last step
    assert {r: sorted(by_budget) for r, by_budget in final.items()} == {"navit": [32, 64], "square": [32, 64]}
    same = markdown([e for e in evals if e["recipe"] == "navit"], [], [])
    assert "| recipe | step 50 | step 100 |" in same and "Steps of each run" not in same


def test_open_clip_checkpoints_carry_their_counted_flops(tmp_path):
    from navit_clip.compare.run import _train_flops

    cfg = load_config(SQUARE)
    assert _train_flops(Job("eval", "open_clip", 0, step=250, budget=64), tmp_path, cfg) == \
        250 * compute.openclip_step_flops(cfg)
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 250, "flops": 5.0e12}) + "\n")
    assert _train_flops(Job("eval", "square", 0, step=250, budget=64), tmp_path, cfg) == 5.0e12  # as logged


def test_flops_or_steps_and_a_budget_kept_on_resume(tmp_path):
    from navit_clip.compare.run import parse_settings

    def settings(**kw):
        return parse_settings(None, None, kw.get("steps"), "0", "navit,square", str(tmp_path), flops=kw.get("flops"))

    assert settings().steps == 1000 and settings().flops is None
    assert settings(flops=2e12).steps is None and settings(flops=2e12).flops == 2e12
    with pytest.raises(InputError, match="not both"):
        settings(steps=100, flops=2e12)
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(InputError, match="--flops must be a positive"):
            settings(flops=bad)
    recorded = settings(flops=2e12).recorded()
    CompareState(tmp_path, recorded).record(Job("train", "navit", 0), {"kind": "train"})
    assert CompareState(tmp_path, recorded).finished(Job("train", "navit", 0))
    with pytest.raises(InputError, match="flops=2000000000000.0"):
        CompareState(tmp_path, {**recorded, "flops": 4e12})


@pytest.fixture(scope="module")
def small_digits(tmp_path_factory) -> dict:
    from navit_clip.data.digits import make_digit_shards

    return make_digit_shards(tmp_path_factory.mktemp("digits"), train_copies=1, eval_per_class=5,
                             max_train_digits=300, shards_train=2, shards_eval=1)


@pytest.mark.slow
def test_compare_to_a_flops_budget_trains_each_recipe_to_it(small_digits, tmp_path):
    """navit with half its sequences costs about half square's step: trained to one budget, it takes
    about twice the steps, and each run's logged FLOPs land within a step pair of the budget."""
    navit = load_config(CONFIG_DIR / "compare" / "navit.yaml", ["data.sequences_per_batch=2"])
    budget = 16 * compute.measured_step_flops(navit, small_digits["train_shards"])
    out = tmp_path / "compare"
    command = [sys.executable, "-m", "navit_clip", "compare", "--shards", small_digits["train_shards"],
               "--eval-shards", small_digits["eval_shards"], "--flops", str(budget), "--checkpoints", "2",
               "--seeds", "0", "--recipes", "navit,square", "--budgets", "64", "--out", str(out),
               "--set", "navit:data.sequences_per_batch=2"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    state = json.loads((out / "state.json").read_text())["done"]
    steps = {r: state[f"{r}-seed0"]["steps"] for r in ("navit", "square")}
    assert steps["navit"] == 16 and 4 <= steps["square"] <= 12 and steps["square"] % 2 == 0
    for recipe, n in steps.items():
        rows = [json.loads(line) for line in (out / "runs" / f"{recipe}-seed0" / "metrics.jsonl").open()]
        logged = next(r["flops"] for r in rows if r.get("step") == n)
        assert abs(logged - budget) <= 1.2 * logged / n, (recipe, logged, budget)  # rounded to a multiple of 2 steps
    table = (out / "table.md").read_text()
    assert f"navit {steps['navit']} steps, square {steps['square']} steps" in table
    assert "| recipe | 50% of the run | 100% of the run |" in table
    assert json.loads((out / "state.json").read_text())["run_steps"] == steps


def test_each_recipe_keeps_the_steps_first_chosen(tmp_path):
    settings = {"shards": "a.tar", "eval_shards": "b.tar", "steps": None, "checkpoints": 2, "flops": 1e12}
    CompareState(tmp_path, settings).keep_steps({"navit": 8})
    again = CompareState(tmp_path, settings)
    assert again.run_steps == {"navit": 8}
    again.keep_steps({"navit": 12, "square": 4})  # navit recounted after a change: the recorded steps stand
    assert CompareState(tmp_path, settings).run_steps == {"navit": 8, "square": 4}
