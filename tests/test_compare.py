"""`navit-clip compare`: the schedule and its resume record, the open_clip_train row (model config,
command line, end-of-shard shim, evaluation towers), the report, and the command end to end."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from navit_clip.compare import openclip_row, recipes as recipe_runs
from navit_clip.compare.openclip_launch import install_shim, skip_nameless
from navit_clip.compare.report import markdown, write_report
from navit_clip.compare.schedule import Job, checkpoint_steps, default_budgets, parse_recipes, pending, plan
from navit_clip.compare.state import CompareState
from navit_clip.config import CONFIG_DIR, load_config
from navit_clip.errors import InputError

DEFAULT = str(CONFIG_DIR / "default.yaml")


# --- the open_clip_train row --------------------------------------------------------------------

def test_openclip_model_config_has_the_default_sizes():
    config = openclip_row.model_config(load_config(DEFAULT))
    assert config == {
        "embed_dim": 128,
        "vision_cfg": {"image_size": 64, "layers": 4, "width": 128, "head_width": 32, "patch_size": 8},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 2},
    }


def test_openclip_model_builds_with_64_patches_and_our_parameter_count_order(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    path = openclip_row.write_model_config(load_config(DEFAULT), tmp_path)
    open_clip.add_model_config(path)
    model = open_clip.create_model(path.stem)
    assert model.visual.positional_embedding.shape == (1 + 64, 128)  # class token + an 8×8 grid
    assert model.text_projection.shape == (128, 128) and model.context_length == 32
    assert len(model.visual.transformer.resblocks) == 4 and len(model.transformer.resblocks) == 2


def test_openclip_train_args_match_the_budget(tmp_path):
    cfg = load_config(CONFIG_DIR / "compare" / "square.yaml")  # the sizes compare gives open_clip_train
    args = openclip_row.train_args(cfg, tmp_path, "shards-{0..1}.tar", steps=1000, checkpoints=4, seed=3)
    value = {args[i]: args[i + 1] for i in range(len(args) - 1) if args[i].startswith("--")}
    assert openclip_row.images_per_step(cfg) == 32  # 32 sequences × 64 tokens / 64 tokens per square image
    assert value["--batch-size"] == "32" and value["--epochs"] == "4"
    assert int(value["--train-num-samples"]) * 4 // 32 == 1000  # steps = samples per epoch / batch × epochs
    assert (value["--lr"], value["--wd"], value["--warmup"], value["--seed"]) == ("0.001", "0.1", "50", "3")
    assert value["--device"] == "cpu" and value["--dataset-type"] == "webdataset"
    with pytest.raises(InputError, match="multiple"):
        openclip_row.train_args(cfg, tmp_path, "x.tar", steps=1001, checkpoints=4, seed=0)


def test_shim_skips_the_nameless_end_of_shard_entry():
    pytest.importorskip("open_clip_train")
    import open_clip_train.data as data

    entries = [{"fname": "a.png", "data": b"1", "__url__": "s.tar"}, {"fname": "a.txt", "data": b"t", "__url__": "s.tar"},
               {"__url__": "s.tar"}]  # webdataset 1.0 ends each tar with an entry that has no file name
    assert [e.get("fname") for e in skip_nameless(entries)] == ["a.png", "a.txt"]
    with pytest.raises(KeyError):
        list(data.group_by_keys_nothrow(iter(entries)))
    original = data.group_by_keys_nothrow
    try:
        install_shim()
        install_shim()  # twice is once
        samples = list(data.group_by_keys_nothrow(iter(entries)))
    finally:
        data.group_by_keys_nothrow = original
    assert [(s["__key__"], s["png"], s["txt"]) for s in samples] == [("a", b"1", b"t")]


def test_our_clip_bpe_ids_are_open_clips_own():
    open_clip = pytest.importorskip("open_clip")
    from navit_clip.data.text import CLIP_BPE, cached_tokenizer

    texts = ["a photo of the number seven.", "an image of a " + "very " * 40 + "long caption"]
    ours = cached_tokenizer(CLIP_BPE, 32)(texts)
    theirs = open_clip.get_tokenizer("ViT-B-32", context_length=32)(texts).numpy()
    assert (ours == theirs).all()


# --- the schedule and its record ---------------------------------------------------------------

def test_plan_trains_each_run_then_evaluates_checkpoints_and_budgets():
    jobs = plan(["navit", "open_clip"], [0, 1], steps={"navit": 100, "open_clip": 100}, checkpoints=4,
                train_budgets={"navit": 49, "open_clip": 64},
                budgets=[16, 32, 64, 128])
    assert checkpoint_steps(100, 4) == [25, 50, 75, 100]
    assert default_budgets(64) == [16, 32, 64, 128]
    first = jobs[:9]
    assert first[0] == Job("train", "navit", 0)
    # each recipe's checkpoints at its own training budget, its final model at every other budget
    assert [(j.step, j.budget) for j in first[1:]] == [(25, 49), (50, 49), (75, 49), (100, 49), (100, 16), (100, 32),
                                                        (100, 64), (100, 128)]
    clip = [j for j in jobs if j.run == "open_clip-seed0"]
    assert [(j.step, j.budget) for j in clip[1:]] == [(25, 64), (50, 64), (75, 64), (100, 64), (100, 16), (100, 32),
                                                      (100, 128)]
    assert len(jobs) == 2 * 9 + 2 * 8 and len({j.id for j in jobs}) == len(jobs)
    assert [j.run for j in jobs if j.kind == "train"] == ["navit-seed0", "navit-seed1", "open_clip-seed0",
                                                          "open_clip-seed1"]
    assert pending(jobs, [j.id for j in jobs[:9]]) == jobs[9:]
    with pytest.raises(InputError, match="multiple"):
        checkpoint_steps(10, 4)
    with pytest.raises(InputError, match="unknown recipe"):
        parse_recipes("navit,resnet")


def test_state_survives_a_restart_and_refuses_other_settings(tmp_path):
    settings = {"shards": "a.tar", "eval_shards": "b.tar", "steps": 8, "checkpoints": 4, "seeds": [0]}
    state = CompareState(tmp_path, settings)
    state.record(Job("train", "navit", 0), {"kind": "train", "recipe": "navit", "seed": 0, "seconds": 1.0})
    again = CompareState(tmp_path, {**settings, "seeds": [0, 1]})  # more seeds: the same comparison, extended
    assert again.finished(Job("train", "navit", 0)) and not again.finished(Job("train", "navit", 1))
    with pytest.raises(InputError, match="steps=8"):
        CompareState(tmp_path, {**settings, "steps": 16})


def _evals(recipe: str, accs: dict[tuple[int, int], list[float]]) -> list[dict]:
    return [{"recipe": recipe, "seed": seed, "step": step, "fraction": step / 100, "budget": budget,
             "tokens_per_image": float(budget), "acc1": acc, "acc5": 1.0, "mean_per_class_recall": acc,
             "train_tokens": step * 2048, "train_flops": None}
            for (step, budget), values in accs.items() for seed, acc in enumerate(values)]


def test_report_reads_each_recipe_at_its_own_training_budget():
    evals = _evals("navit", {(50, 49): [0.5], (100, 49): [0.6], (100, 64): [0.55]})
    evals += _evals("square", {(50, 64): [0.2], (100, 64): [0.3], (100, 32): [0.1]})
    text = markdown(evals, [], [])
    assert "| navit (49 tokens) | 50.0% ± 0.0% (n=1) | 60.0% ± 0.0% (n=1) |" in text
    assert "| square (64 tokens) | 20.0% ± 0.0% (n=1) | 30.0% ± 0.0% (n=1) |" in text


def test_report_means_and_deviations_over_seeds(tmp_path):
    evals = _evals("navit", {(50, 64): [0.2, 0.4], (100, 64): [0.5, 0.7], (100, 32): [0.4, 0.6]})
    evals += _evals("open_clip", {(50, 64): [0.1, 0.1], (100, 64): [0.3, 0.3], (100, 32): [0.2, 0.2]})
    text = markdown(evals, [{"recipe": "navit", "seconds": 10.0}], ["a note"])
    assert "| navit (64 tokens) | 30.0% ± 14.1% (n=2) | 60.0% ± 14.1% (n=2) |" in text  # stdev of (0.2, 0.4) = 0.1414
    assert "| open_clip | 20.0% ± 0.0% (n=2) | 30.0% ± 0.0% (n=2) |" in text  # the 32-token row: final models
    assert "_a note_" in text and "| navit | 10 | 1 |" in text
    written = write_report(tmp_path, evals, [], [])
    rows = list(csv.DictReader(written["csv"].open()))
    assert len(rows) == len(evals) and {r["recipe"] for r in rows} == {"navit", "open_clip"}
    for key in ("compute_plot", "inference_plot"):
        assert written[key].read_bytes()[:4] == b"\x89PNG"


# --- trainings at a time (--jobs) ---------------------------------------------------------------

def _scheduled(monkeypatch, jobs: int, seconds: dict[str, float], fails: str | None = None) -> tuple[list, list, Exception | None]:
    """Run compare.run.train_runs over one training per entry of `seconds`, each a stand-in that
    takes that long in the pool's thread (the real one waits on a child process the same way);
    -> (events in order, the trainings recorded, the error train_runs raised)."""
    import threading

    from navit_clip.compare import run as compare_run

    events, recorded, lock, main = [], [], threading.Lock(), threading.get_ident()

    def fake_train(job, settings, steps):
        with lock:
            events.append(("start", job.seed))
        time.sleep(seconds[str(job.seed)])
        with lock:
            events.append(("end", job.seed))
        if str(job.seed) == fails:
            raise RuntimeError(f"training seed {job.seed} failed")
        return {"kind": "train", "seed": job.seed}

    def trained(job, result):
        assert threading.get_ident() == main, "state.json must have one writer"
        with lock:
            events.append(("trained", job.seed))
        time.sleep(0.05)  # its evaluations: the slot stays taken meanwhile
        recorded.append(result["seed"])

    monkeypatch.setattr(compare_run, "_train", fake_train)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    settings = compare_run.Settings(shards="", eval_shards="", steps=4, seeds=[], recipes=["navit"],
                                    out=Path("."), jobs=jobs)
    trainings = [Job("train", "navit", int(seed)) for seed in seconds]
    error = None
    try:
        compare_run.train_runs(trainings, settings, trained, {"navit": 4})
    except RuntimeError as exc:
        error = exc
    return events, recorded, error


def _most_at_once(events: list) -> int:
    now = most = 0
    for kind, _ in events:
        now += {"start": 1, "trained": -1}.get(kind, 0)
        most = max(most, now)
    return most


@pytest.mark.parametrize("jobs", [1, 2, 3])
def test_trainings_run_jobs_at_a_time_each_evaluated_before_its_slot_is_reused(monkeypatch, jobs):
    events, recorded, error = _scheduled(monkeypatch, jobs, {"0": 0.3, "1": 0.1, "2": 0.1, "3": 0.1})
    assert error is None and sorted(recorded) == [0, 1, 2, 3]
    assert _most_at_once(events) == jobs  # never more trainings (with their evaluation) than --jobs
    for seed in range(4):
        assert events.index(("end", seed)) < events.index(("trained", seed))
    if jobs == 1:  # one after another, as before --jobs existed
        assert events == [(kind, seed) for seed in range(4) for kind in ("start", "end", "trained")]
    else:  # the short ones finish and are recorded while the long one still trains
        assert events.index(("trained", 1)) < events.index(("end", 0))


def test_a_failed_training_starts_no_other_lets_the_running_finish_and_is_raised(monkeypatch):
    events, recorded, error = _scheduled(monkeypatch, 2, {"0": 0.05, "1": 0.3, "2": 0.05}, fails="0")
    assert str(error) == "training seed 0 failed"
    assert recorded == [1]  # the one running beside it finished and was recorded
    assert ("start", 2) not in events  # no other was started


def test_set_changes_one_recipes_config_and_is_checked_before_anything_trains():
    from navit_clip.compare.run import parse_overrides

    chosen = ["navit", "square"]
    overrides = parse_overrides(["navit:data.sequences_per_batch=2", "navit:train.steps=5", "square:optim.lr=0.002"],
                                chosen)
    assert overrides == {"navit": ["data.sequences_per_batch=2", "train.steps=5"], "square": ["optim.lr=0.002"]}
    assert recipe_runs.recipe_config("navit", overrides["navit"]).data.sequences_per_batch == 2
    assert recipe_runs.recipe_config("navit").data.sequences_per_batch != 2
    with pytest.raises(InputError, match="RECIPE:KEY=VALUE"):
        parse_overrides(["data.sequences_per_batch=8"], chosen)
    with pytest.raises(InputError, match="'open_clip' is not one of the recipes compared"):
        parse_overrides(["open_clip:optim.lr=0.1"], chosen)
    with pytest.raises(Exception, match="data.sequences_per_batchh"):
        parse_overrides(["navit:data.sequences_per_batchh=8"], chosen)


def test_a_comparison_is_not_resumed_with_other_recipe_changes(tmp_path):
    settings = {"shards": "a.tar", "eval_shards": "b.tar", "steps": 8, "checkpoints": 4, "seeds": [0]}
    CompareState(tmp_path, settings).record(Job("train", "navit", 0), {"kind": "train"})  # recorded without any
    assert CompareState(tmp_path, {**settings, "overrides": {}}).finished(Job("train", "navit", 0))
    with pytest.raises(InputError, match="overrides="):
        CompareState(tmp_path, {**settings, "overrides": {"navit": ["data.sequences_per_batch=8"]}})


def test_jobs_must_be_positive():
    from navit_clip.compare.run import parse_jobs

    assert parse_jobs(3) == 3
    with pytest.raises(InputError, match="--jobs must be at least 1"):
        parse_jobs(0)


# --- the command, end to end -------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_digits(tmp_path_factory) -> dict:
    from navit_clip.data.digits import make_digit_shards

    return make_digit_shards(tmp_path_factory.mktemp("digits"), train_copies=1, eval_per_class=5,
                             max_train_digits=300, shards_train=2, shards_eval=1)


def _state(out: Path) -> dict:
    path = out / "state.json"
    return json.loads(path.read_text())["done"] if path.exists() else {}


@pytest.mark.slow
def test_compare_end_to_end_resumes_without_retraining(small_digits, tmp_path):
    """Killed after its first run is recorded, a rerun of the same command trains nothing again
    (the run's log is untouched) and completes the table, CSV and plots, with the open_clip_train
    row when open_clip_train is installed. Two trainings at a time (--jobs 2): the kill also stops
    the other run mid-way, which the rerun finishes."""
    out = tmp_path / "compare"
    command = [sys.executable, "-m", "navit_clip", "compare", "--shards", small_digits["train_shards"],
               "--eval-shards", small_digits["eval_shards"], "--steps", "4", "--checkpoints", "2", "--seeds", "0",
               "--recipes", "navit,open_clip", "--budgets", "32,64", "--out", str(out), "--jobs", "2",
               "--set", "navit:data.sequences_per_batch=3"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    first = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    deadline = time.monotonic() + 900
    while "navit-seed0" not in _state(out) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert "navit-seed0" in _state(out), "the first run was not recorded"
    log = out / "runs" / "navit-seed0" / "train.log"
    before = log.stat().st_mtime_ns
    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert log.stat().st_mtime_ns == before  # not trained again
    done = _state(out)
    with_openclip = openclip_row.available() is None
    recipes = ["navit", "open_clip"] if with_openclip else ["navit"]
    expected = plan(recipes, [0], steps={r: 4 for r in recipes}, checkpoints=2,
                    train_budgets={r: recipe_runs.training_budget(r) for r in recipes}, budgets=[32, 64])
    assert set(done) == {job.id for job in expected}
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert {(r["recipe"], int(r["step"]), int(r["budget"])) for r in rows} == {
        (j.recipe, j.step, j.budget) for j in expected if j.kind == "eval"}
    assert all(0.0 <= float(r["acc1"]) <= 1.0 for r in rows)
    table = (out / "table.md").read_text()
    assert "| navit (" in table and ("| open_clip (64 tokens) |" in table) == with_openclip
    assert "navit recipe with data.sequences_per_batch=3" in table
    trained = json.loads((out / "runs" / "navit-seed0" / "config.json").read_text())
    assert trained["data"]["sequences_per_batch"] == 3
    assert {r["train_tokens"] for r in rows if r["recipe"] == "navit" and r["step"] == "2"} == {str(2 * 3 * trained["data"]["seq_len"])}
    if not with_openclip:
        assert "open_clip row skipped" in table
    for png in ("accuracy_vs_compute.png", "accuracy_vs_inference_tokens.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
