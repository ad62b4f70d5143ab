"""The GPU check's CPU-side parts (tools/gpu_check.py, gpu_prepare.py, gpu_report.py): the list
of wheels a bare GPU machine needs, the shards its training run reads, the parsing of the
benchmarks' output, the report, and the dry run end to end (what CI runs)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import gpu_check  # noqa: E402
import gpu_prepare as prep  # noqa: E402
from gpu_report import StepResult, goals, render_report  # noqa: E402


def touch_wheels(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"")


def test_wheel_plan_installs_only_what_does_not_import(tmp_path):
    touch_wheels(tmp_path, ["deepspeed-0.19.8-py3-none-any.whl", "open_clip_torch-3.3.0-py3-none-any.whl",
                            "torch-2.14.1-cp312-cp312-manylinux_2_28_x86_64.whl",
                            "pydantic_core-2.50.5-cp312-cp312-manylinux_2_17_x86_64.whl"])
    absent = {"deepspeed", "open_clip", "pydantic_core", "webdataset"}
    plan = prep.wheel_plan(tmp_path, importable=lambda module: module not in absent)
    assert sorted(Path(p).name.split("-")[0] for p in plan["install"]) == ["deepspeed", "open_clip_torch",
                                                                        "pydantic_core"]
    assert plan["missing"] == ["webdataset"]
    assert not any("torch-2" in Path(p).name for p in plan["install"])  # the machine's torch stays


def test_wheel_plan_takes_the_optional_flash_wheel_when_present(tmp_path):
    touch_wheels(tmp_path, ["flash_attn-2.8.3-cp312-cp312-linux_x86_64.whl"])
    plan = prep.wheel_plan(tmp_path, importable=lambda module: module != "flash_attn")
    assert [Path(p).name for p in plan["optional"]] == ["flash_attn-2.8.3-cp312-cp312-linux_x86_64.whl"]
    assert plan["missing"] == []
    assert prep.wheel_plan(tmp_path / "none", importable=lambda module: module != "flash_attn")["install"] == []


def test_everything_importable_needs_no_wheel(tmp_path):
    plan = prep.wheel_plan(tmp_path, importable=lambda module: True)
    assert plan == {"install": [], "missing": [], "optional": []}


def test_download_requirements_pin_constraints_then_local_versions(tmp_path):
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("# pins\ntorch==2.14.1\ndeepspeed==0.19.8\nPyYAML==6.0.4  # yaml\n")
    lines = prep.download_requirements(constraints, installed_version=lambda d: "1.0" if d == "hjson" else None)
    assert "deepspeed==0.19.8" in lines and "PyYAML==6.0.4" in lines and "hjson==1.0" in lines
    assert "webdataset" in lines  # neither pinned nor installed: the bare name
    assert not any(line.startswith("torch") for line in lines)


def test_every_dependency_of_the_project_is_in_the_wheel_list():
    tomllib = pytest.importorskip("tomllib")
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {prep.normalize(d.split(">")[0].split("<")[0].split("=")[0].strip()) for d in declared}
    listed = {prep.normalize(dist) for _, dist in prep.NEEDED_MODULES}
    assert names - listed == {"torch"}


def test_size_csv_feeds_bench_tower(tmp_path):
    from size_csv import read_sizes

    sizes = read_sizes(str(prep.write_size_csv(tmp_path / "sizes.csv", count=500)))
    assert len(sizes) == 500 and all(16 <= w <= 4096 and 16 <= h <= 4096 for w, h in sizes)
    aspects = [w / h for w, h in sizes]
    assert min(aspects) < 0.5 and max(aspects) > 2  # wide and tall images alike


def test_train_shards_are_read_by_the_training_stream(tmp_path):
    import itertools

    from conftest import stream_from_config
    from navit_clip.data.loader import PackedStream

    info = prep.make_train_shards(tmp_path, digits=12, shards=2)
    assert info["num_train"] == 12 and len(list(tmp_path.glob("train-*.tar"))) == 2
    overrides = ["model.vision.patch_size=16", "data.seq_len=256", "data.max_images=8",
                 "data.resolution.max_tokens=256"]
    spec = stream_from_config(info["train_shards"], overrides, loop=False)
    batches = list(itertools.islice(iter(PackedStream(spec)), 4))
    grids = {tuple(g) for b in batches for g, v in zip(b.grid.reshape(-1, 2).tolist(), b.valid.reshape(-1)) if v}
    assert sum(int(b.valid.sum()) for b in batches) == 12
    assert len(grids) > 3  # many sizes and shapes, not one


def test_train_overrides_are_a_valid_config():
    from navit_clip.config import load_config

    cfg = load_config(None, gpu_check.train_overrides("s-{000000..000007}.tar", Path("/tmp/run")))
    assert (cfg.model.vision.width, cfg.model.vision.depth, cfg.model.vision.patch_size) == (768, 12, 16)
    assert cfg.train.precision == "bf16" and cfg.train.steps == 30 and cfg.train.peak_tflops > 0
    assert "zero1" in cfg.train.deepspeed


BENCH_TOWER_OUTPUT = """cuda bfloat16, torch 2.11.0, 16 threads; sizes from s.csv, patch 16
[tower] NaViT B/16 (86.0M), 700 images
  forward           packed   5000.0 img/s   padded   3000.0 img/s   packed/padded = 1.67x
  forward+backward  packed   1800.5 img/s   padded    900.2 img/s   packed/padded = 2.00x

[gpu] bf16 fwd+bwd S=32 L=1024 H=12 Dh=64: flex packed 1.52 ms, unmasked SDPA 1.60 ms, flex/unmasked speed = 1.05x
[gpu] NaViT-B/16 fwd+bwd on 32×1024 tokens: 95.3 ms, 410.2 TFLOP/s, MFU 41.5% of 989 TFLOP/s bf16 peak
"""


def test_parse_bench_tower_reads_the_gpu_figures():
    figures = prep.parse_bench_tower(BENCH_TOWER_OUTPUT)
    assert figures == {"seq_len": 1024, "flex_ms": 1.52, "sdpa_ms": 1.60, "flex_vs_sdpa": 1.05, "b16_ms": 95.3,
                       "b16_tflops": 410.2, "b16_mfu": pytest.approx(0.415), "tower_packed_img_s": 1800.5,
                       "tower_padded_img_s": 900.2}
    assert prep.parse_bench_tower("[gpu] no CUDA device: nothing measured") == {}


def test_parse_bench_loss_and_train_metrics(tmp_path):
    rows = [{"world": 1, "batch": 4096, "ours": [10.0, 0.1]},
            {"world": 1, "batch": 32768, "ours": [64.0, 0.5], "open_clip": [16384.0, 0.9], "loss_diff": 1e-6}]
    (tmp_path / "loss.json").write_text(json.dumps(rows))
    assert prep.parse_bench_loss(tmp_path / "loss.json") == {
        "batch": 32768, "world": 1, "ours_mib": 64.0, "ours_s": 0.5, "open_clip_mib": 16384.0, "open_clip_s": 0.9,
        "loss_diff": 1e-6}
    metrics = [{"step": 10, "loss": 6.0, "images_per_s": 10.0}, {"step": 30, "loss": 4.5, "images_per_s": 2000.0,
               "tokens_per_s": 3e5, "mfu": 0.3, "peak_memory_gib": 40.0, "world_size": 1}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))
    figures = prep.parse_train_metrics(tmp_path / "metrics.jsonl")
    assert figures["step"] == 30 and figures["first_loss"] == 6.0 and figures["peak_memory_gib"] == 40.0
    assert figures["images_per_s"] == 2000.0 and figures["mfu"] == 0.3


def test_report_holds_every_figure_status_and_goal():
    results = [StepResult("tests", "passed", "", {"passed": 40, "skipped": 2}),
               StepResult("tower", "failed", "bench | broke", {"flex_vs_sdpa": 0.85, "b16_mfu": 0.5}, 12.5)]
    text = render_report(results, goals(results), env_lines=["GPU: test"])
    assert "result: **FAILED: tower**" in text
    assert "| tower | failed | 12.5 | bench \\| broke |" in text
    assert "| passed | 40 |" in text and "| flex_vs_sdpa | 0.85 |" in text
    assert "| flex packed >= 0.9x unmasked SDPA at the same L (bf16 fwd+bwd) | 0.85 | MISSED |" in text
    assert "| NaViT-B/16 forward+backward MFU >= 45% | 0.5 | met |" in text
    assert [g[2] for g in goals([])] == ["not measured", "not measured"]
    with pytest.raises(ValueError):
        StepResult("x", "ok")


def test_a_step_that_raises_fails_alone(tmp_path, monkeypatch):
    def broken(check, limit):
        raise RuntimeError("boom")

    monkeypatch.setitem(gpu_check.STEPS, "tower", broken)
    check = gpu_check.Check(tmp_path / "out", tmp_path / "wheels", tmp_path / "work", dry_reason="")
    monkeypatch.setitem(gpu_check.STEPS, "loss", lambda c, limit: StepResult("loss", "passed", f"{limit:.0f}"))
    results = gpu_check.run_steps(check, ["tower", "loss"], budget=30)
    assert [(r.status, r.reason) for r in results] == [("failed", "RuntimeError: boom"), ("passed", "30")]


def test_dry_run_end_to_end(tmp_path):
    """What CI runs: every step skipped with its reason, exit status 0, the report written."""
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, "tools/gpu_check.py", "--dry", "--out", str(out), "--work",
                           str(tmp_path / "work"), "--wheels", str(tmp_path / "no-wheels")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    text = (out / "report.md").read_text()
    for step in gpu_check.STEPS:
        assert f"| {step} | skipped |" in text
    assert "dry run (--dry)" in text and "result: **dry run: nothing measured**" in text
    assert not list(out.glob("*.log"))  # nothing was run
