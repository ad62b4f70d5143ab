"""The CPU-side parts of the GPU check (tools/gpu_check.py): which packages a bare GPU machine
lacks and the wheels that supply them, the shards and image sizes its runs read, and the parsing
of the benchmarks' output. Everything here runs and is tested without a GPU."""

from __future__ import annotations

import csv
import importlib.util
import json
import re
from pathlib import Path

import numpy as np

# What training, the tests and the benchmarks import beyond torch, as (import name, distribution):
# the project's own needs and those of deepspeed, open_clip and webdataset. torch and torchvision
# are never in the list: the GPU machine's own CUDA build stays.
NEEDED_MODULES: tuple[tuple[str, str], ...] = (
    ("deepspeed", "deepspeed"), ("webdataset", "webdataset"), ("open_clip", "open-clip-torch"),
    ("braceexpand", "braceexpand"), ("mlxtend", "mlxtend"), ("hjson", "hjson"), ("pydantic", "pydantic"),
    ("pydantic_core", "pydantic-core"), ("annotated_types", "annotated-types"),
    ("typing_inspection", "typing-inspection"), ("typing_extensions", "typing-extensions"),
    ("msgpack", "msgpack"), ("cpuinfo", "py-cpuinfo"), ("psutil", "psutil"), ("ninja", "ninja"),
    ("packaging", "packaging"), ("ftfy", "ftfy"), ("wcwidth", "wcwidth"), ("regex", "regex"),
    ("timm", "timm"), ("huggingface_hub", "huggingface-hub"), ("safetensors", "safetensors"),
    ("einops", "einops"), ("yaml", "PyYAML"), ("tqdm", "tqdm"), ("PIL", "pillow"), ("numpy", "numpy"),
    ("tensorboard", "tensorboard"), ("matplotlib", "matplotlib"), ("sentencepiece", "sentencepiece"),
    ("pytest", "pytest"),
)
# Installed when its wheel is in the folder, and no failure when it is not (the flash backend).
OPTIONAL_MODULES: tuple[tuple[str, str], ...] = (("flash_attn", "flash-attn"),)


def normalize(name: str) -> str:
    """A distribution name as wheel file names spell it (PEP 503, with underscores)."""
    return re.sub(r"[-_.]+", "_", name).lower()


def missing_distributions(modules=NEEDED_MODULES, importable=None) -> list[str]:
    """The distributions whose module this Python cannot import, in NEEDED_MODULES order."""
    importable = importable or (lambda module: importlib.util.find_spec(module) is not None)
    return [dist for module, dist in modules if not importable(module)]


def wheels_in(folder: Path) -> dict[str, Path]:
    """normalized distribution name -> wheel file in `folder` (empty when there is no folder)."""
    if not folder.is_dir():
        return {}
    return {normalize(path.name.split("-")[0]): path for path in sorted(folder.glob("*.whl"))}


def wheel_plan(folder: Path, importable=None) -> dict[str, list[str]]:
    """What to install from `folder`: {"install": [wheel files], "missing": [distributions with no
    wheel], "optional": [optional wheels found]}; nothing for what is importable already."""
    wheels = wheels_in(folder)
    needed = missing_distributions(NEEDED_MODULES, importable)
    optional = missing_distributions(OPTIONAL_MODULES, importable)
    install = [str(wheels[normalize(d)]) for d in needed if normalize(d) in wheels]
    extra = [str(wheels[normalize(d)]) for d in optional if normalize(d) in wheels]
    return {"install": install + extra, "missing": [d for d in needed if normalize(d) not in wheels],
            "optional": extra}


def pinned_versions(constraints: Path) -> dict[str, str]:
    """normalized name -> version of each `name==version` line of constraints.txt."""
    pins = {}
    for line in constraints.read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[normalize(name)] = version.strip()
    return pins


def download_requirements(constraints: Path, installed_version=None) -> list[str]:
    """`name==version` for every distribution of NEEDED_MODULES and OPTIONAL_MODULES: the version
    constraints.txt pins, else the one installed here, else the bare name."""
    from importlib import metadata

    def here(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    installed_version = installed_version or here
    pins = pinned_versions(constraints)
    out = []
    for _, dist in (*NEEDED_MODULES, *OPTIONAL_MODULES):
        version = pins.get(normalize(dist)) or installed_version(dist)
        out.append(f"{dist}=={version}" if version else dist)
    return out


def write_size_csv(path: Path, count: int = 4000, seed: int = 0) -> Path:
    """A width,height CSV for bench_tower.py, drawn like web images: sides around 400 px (log
    normal), aspect ratios from 1:3 to 3:1."""
    rng = np.random.default_rng(seed)
    area = np.exp(rng.normal(np.log(400 * 400), 0.6, count))
    aspect = np.exp(rng.uniform(np.log(1 / 3), np.log(3), count))
    widths = np.clip(np.sqrt(area * aspect), 16, 4096).astype(int)
    heights = np.clip(np.sqrt(area / aspect), 16, 4096).astype(int)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["width", "height"])
        writer.writerows(zip(widths.tolist(), heights.tolist()))
    return path


def make_train_shards(out: Path, digits: int = 2000, shards: int = 8, seed: int = 0) -> dict:
    """Training shards for the GPU run: the bundled digits dataset on larger canvases (up to about
    16×48 patches of 16 px), so a B/16 batch holds images of many sizes and shapes."""
    from navit_clip.data.digits import CanvasSpec, make_digit_shards

    spec = CanvasSpec(short_side=(48, 256), max_long_side=768)
    return make_digit_shards(out, train_copies=1, eval_per_class=1, max_train_digits=digits, shards_train=shards,
                             shards_eval=1, seed=seed, spec=spec)


_FLEX = re.compile(r"\[gpu\] bf16 fwd\+bwd S=(\d+) L=(\d+).*?flex packed ([\d.]+) ms, unmasked SDPA ([\d.]+) ms, "
                   r"flex/unmasked speed = ([\d.]+)x")
_MFU = re.compile(r"\[gpu\] NaViT-B/16 fwd\+bwd on .*?: ([\d.]+) ms, ([\d.]+) TFLOP/s, MFU ([\d.]+)%")
_TOWER = re.compile(r"forward\+backward\s+packed\s+([\d.]+) img/s\s+padded\s+([\d.]+) img/s")


def parse_bench_tower(text: str) -> dict[str, float]:
    """The figures of bench_tower.py's GPU part (and its tower line) from its printed output."""
    figures: dict[str, float] = {}
    if m := _FLEX.search(text):
        figures.update(seq_len=int(m[2]), flex_ms=float(m[3]), sdpa_ms=float(m[4]), flex_vs_sdpa=float(m[5]))
    if m := _MFU.search(text):
        figures.update(b16_ms=float(m[1]), b16_tflops=float(m[2]), b16_mfu=float(m[3]) / 100)
    if m := _TOWER.search(text):
        figures.update(tower_packed_img_s=float(m[1]), tower_padded_img_s=float(m[2]))
    return figures


def parse_bench_loss(path: Path) -> dict[str, float]:
    """Figures of the largest batch in bench_loss.py's --json rows."""
    row = max(json.loads(path.read_text()), key=lambda r: r["batch"])
    figures = {"batch": row["batch"], "world": row["world"], "ours_mib": row["ours"][0], "ours_s": row["ours"][1]}
    if "open_clip" in row:
        figures.update(open_clip_mib=row["open_clip"][0], open_clip_s=row["open_clip"][1],
                       loss_diff=row["loss_diff"])
    return figures


def parse_train_metrics(path: Path) -> dict[str, float]:
    """The last metrics row of a run (steady state: the first row holds compilation), and the
    first row's loss."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    last = rows[-1]
    keys = ("step", "world_size", "loss", "images_per_s", "tokens_per_s", "mfu", "peak_memory_gib", "sec_per_step",
            "padding")
    figures = {key: last[key] for key in keys if last.get(key) is not None}
    if rows[0].get("loss") is not None:
        figures["first_loss"] = rows[0]["loss"]
    return figures


if __name__ == "__main__":
    # `python tools/gpu_prepare.py`: the requirement lines to download wheels for (docs/gpu.md)
    print("\n".join(download_requirements(Path(__file__).resolve().parents[1] / "constraints.txt")))
