"""One prepared check of every GPU path, in one short run on one H100/H200 (docs/gpu.md):

  1. install   what is missing (deepspeed, webdataset, open_clip, ...) from a folder of wheels,
               into a folder of its own: the machine's torch is never touched
  2. tests     `pytest -m gpu`: every attention backend against the reference, bf16 and fp32
  3. tower     bench_tower.py's GPU part: flex packed vs unmasked SDPA, NaViT-B/16 MFU
  4. train     NaViT-B/16-CLIP, 30 steps under DeepSpeed (nccl, bf16, ZeRO-1) from generated shards
  5. loss      chunked loss at a per-rank batch of 32k vs open_clip's ClipLoss (memory, time)

It writes --out/report.md (every figure) and one log per step, and exits 1 if a check failed.
Without CUDA (or with --dry) every step says why it is skipped and the exit status is 0.

    python tools/gpu_check.py --out gpu_report --wheels gpu_wheels
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import gpu_prepare as prep
from gpu_report import StepResult, goals, write_report

ROOT = Path(__file__).resolve().parents[1]
# Seconds each step may take at most; together they fit the 8 minutes of one GPU window.
STEP_LIMITS = {"install": 45, "tests": 150, "tower": 90, "train": 150, "loss": 45}
PEAK_TFLOPS = 989.0  # dense bf16 of an H100 SXM; an H200 has the same compute


@dataclass
class Check:
    out: Path
    wheels: Path
    work: Path
    dry_reason: str = ""  # why nothing runs on a GPU; empty when it does
    site: Path = field(init=False)

    def __post_init__(self) -> None:
        self.site = self.work / "site-packages"

    def env(self) -> dict[str, str]:
        """The environment of every child: the tree, tools/ and the installed wheels importable."""
        paths = [str(ROOT), str(ROOT / "tools"), str(self.site), os.environ.get("PYTHONPATH", "")]
        return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p), "PYTHONUNBUFFERED": "1"}

    def run(self, name: str, cmd: list[str], limit: float) -> tuple[int, str]:
        """Run `cmd` in the tree, its output in --out/<name>.log; -> (exit status, output).
        Status 124 when it ran past `limit` seconds (it is killed with its children)."""
        log = self.out / f"{name}.log"
        with log.open("w") as f:
            f.write("$ " + " ".join(cmd) + "\n")
            f.flush()
            proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env(), stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()
                rc = 124
        return rc, log.read_text(errors="replace")


def step_install(check: Check, limit: float) -> StepResult:
    plan = prep.wheel_plan(check.wheels)
    figures = {"to install": len(plan["install"]), "missing wheels": ", ".join(plan["missing"]) or "none",
               "flash-attn wheel": "yes" if plan["optional"] else "no"}
    if check.dry_reason:
        return StepResult("install", "skipped", check.dry_reason, figures)
    if plan["missing"]:
        return StepResult("install", "failed", f"no wheel in {check.wheels} for: {', '.join(plan['missing'])}",
                          figures)
    if not plan["install"]:
        return StepResult("install", "passed", "everything is importable already", figures)
    rc, output = check.run("install", [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                                       "--no-compile", "--find-links", str(check.wheels), "--target",
                                       str(check.site), *plan["install"]], limit)
    if rc:
        return StepResult("install", "failed", f"pip exited {rc}: {output.strip().splitlines()[-1]}", figures)
    return StepResult("install", "passed", f"installed {len(plan['install'])} wheels into {check.site}", figures)


def step_tests(check: Check, limit: float) -> StepResult:
    if check.dry_reason:
        return StepResult("tests", "skipped", check.dry_reason)
    rc, output = check.run("tests", [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                                     "tests"], limit)
    counts = {word: int(n) for n, word in re_counts(output)}
    if rc or counts.get("failed") or counts.get("error") or not counts.get("passed"):
        return StepResult("tests", "failed", f"pytest exited {rc}", counts)
    return StepResult("tests", "passed", "", counts)


def re_counts(output: str) -> list[tuple[str, str]]:
    import re

    summary = output.strip().splitlines()[-1] if output.strip() else ""
    return [(n, "error" if w.startswith("error") else w)
            for n, w in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", summary)]


def step_tower(check: Check, limit: float) -> StepResult:
    if check.dry_reason:
        return StepResult("tower", "skipped", check.dry_reason)
    sizes = prep.write_size_csv(check.work / "sizes.csv")
    rc, output = check.run("tower", [sys.executable, "tools/bench_tower.py", str(sizes), "--preset", "B/16",
                                     "--max-side", "64", "--max-tokens", "256", "--seq-len", "1024",
                                     "--max-images", "32", "--sequences", "32", "--reps", "5",
                                     "--peak-tflops", str(PEAK_TFLOPS)], limit)
    figures = prep.parse_bench_tower(output)
    if rc or "b16_mfu" not in figures or "flex_vs_sdpa" not in figures:
        return StepResult("tower", "failed", f"bench_tower.py exited {rc}" + ("" if rc else ", figures missing"),
                          figures)
    return StepResult("tower", "passed", "", figures)


def train_overrides(shards: str, out_dir: Path, steps: int = 30) -> list[str]:
    """NaViT-B/16 with a CLIP-B text tower, bf16, ZeRO-1, 32 sequences of 1024 tokens per step."""
    return ["model.vision.preset=B/16", "model.vision.max_grid_side=64", "model.embed_dim=512",
            "model.text.width=512", "model.text.depth=12", "model.text.heads=8",
            f"data.train_shards={shards}", "data.seq_len=1024", "data.max_images=32", "data.sequences_per_batch=32",
            "data.resolution.max_tokens=256", "data.num_workers=8", "train.precision=bf16",
            "train.deepspeed=configs/deepspeed/gpu_zero1_bf16.json", f"train.steps={steps}", "train.log_every=10",
            "train.ckpt_every=1000", f"train.peak_tflops={PEAK_TFLOPS}", f"train.out_dir={out_dir}",
            "optim.warmup_steps=5", "train.resume=false"]


def step_train(check: Check, limit: float) -> StepResult:
    if check.dry_reason:
        return StepResult("train", "skipped", check.dry_reason)
    start = time.monotonic()
    info = prep.make_train_shards(check.work / "shards")
    out_dir = check.work / "train"
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port", "29511",
           "--module", "navit_clip.cli", "train", *train_overrides(info["train_shards"], out_dir)]
    rc, _ = check.run("train", cmd, limit - (time.monotonic() - start))
    metrics = out_dir / "metrics.jsonl"
    figures = prep.parse_train_metrics(metrics) if metrics.exists() else {}
    if rc or figures.get("step") != 30:
        return StepResult("train", "failed", f"training exited {rc} after step {figures.get('step', 0)}", figures)
    return StepResult("train", "passed", f"{info['num_train']} generated images", figures)


def step_loss(check: Check, limit: float) -> StepResult:
    if check.dry_reason:
        return StepResult("loss", "skipped", check.dry_reason)
    rows = check.work / "loss.json"
    rc, _ = check.run("loss", [sys.executable, "tools/bench_loss.py", "--device", "cuda", "--world", "1",
                               "--batch", "32768", "--dim", "512", "--chunk", "4096", "--repeats", "3",
                               "--baseline-max", "32768", "--json", str(rows)], limit)
    figures = prep.parse_bench_loss(rows) if rows.exists() else {}
    if rc or "open_clip_mib" not in figures:
        return StepResult("loss", "failed", f"bench_loss.py exited {rc}", figures)
    if figures["loss_diff"] > 1e-3:
        return StepResult("loss", "failed", f"losses differ by {figures['loss_diff']:.2e}", figures)
    return StepResult("loss", "passed", "", figures)


STEPS = {"install": step_install, "tests": step_tests, "tower": step_tower, "train": step_train, "loss": step_loss}


def run_steps(check: Check, names: list[str], budget: float) -> list[StepResult]:
    """Each step under its own limit and what is left of `budget`; an error fails that step only."""
    results, deadline = [], time.monotonic() + budget
    for name in names:
        start = time.monotonic()
        limit = min(STEP_LIMITS[name], deadline - start)
        try:
            result = STEPS[name](check, limit) if limit > 1 else StepResult(name, "failed", "no time left")
        except Exception as exc:  # a broken step is reported, and the next one still runs
            result = StepResult(name, "failed", f"{type(exc).__name__}: {exc}")
        if not check.dry_reason and name == "install" and result.status == "failed":
            check.dry_reason = "the install step failed"
        importlib.invalidate_caches()  # what the install step put in check.site
        result.seconds = time.monotonic() - start
        print(f"[{name}] {result.status} {result.reason}", flush=True)
        results.append(result)
    return results


def dry_reason(force: bool) -> str:
    if force:
        return "dry run (--dry)"
    import torch

    return "" if torch.cuda.is_available() else "no CUDA device (torch.cuda.is_available() is False)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="report folder: report.md and one log per step")
    parser.add_argument("--wheels", default=str(ROOT / "gpu_wheels"), help="folder of wheels to install from")
    parser.add_argument("--work", default="/tmp/navit_gpu_check", help="shards, installed wheels, the training run")
    parser.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for all steps together")
    parser.add_argument("--dry", action="store_true", help="skip every GPU step even when CUDA is present")
    args = parser.parse_args(argv)
    names = [n for n in args.steps.split(",") if n]
    if unknown := [n for n in names if n not in STEPS]:
        parser.error(f"unknown steps: {', '.join(unknown)} (known: {', '.join(STEPS)})")
    check = Check(Path(args.out), Path(args.wheels), Path(args.work), dry_reason(args.dry))
    check.out.mkdir(parents=True, exist_ok=True)
    check.work.mkdir(parents=True, exist_ok=True)
    sys.path[:0] = [str(ROOT), str(check.site)]  # the shards of the train step are written in this process
    results = run_steps(check, names, args.budget)
    report = write_report(check.out / "report.md", results, goals(results), check.dry_reason)
    print(f"report: {report}")
    return 1 if any(r.status == "failed" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
