"""A non-editable install runs from any directory: the wheel carries every module and the configs.

The wheel is built from a copy of the sources, installed without `-e` into a fresh target folder,
and used from another directory, so nothing of the checkout can stand in for what is missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "navit_clip", "configs")


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder a wheel of the current sources was installed into (`pip install --target`)."""
    root = tmp_path_factory.mktemp("install")
    src = root / "src"
    src.mkdir()
    for name in SOURCES:
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy
        copy(REPO / name, src / name, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                         if (REPO / name).is_dir() else {}))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(root / "dist"), str(src)], cwd=root)
    wheel = next((root / "dist").glob("navit_clip-*.whl"))
    target = root / "target"
    _run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], cwd=root)
    return target


def _env(target: Path) -> dict[str, str]:
    # the target first: an editable install of the checkout in this environment must not stand in
    return {**os.environ, "PYTHONPATH": str(target)}


def test_wheel_holds_every_module_and_config(installed: Path) -> None:
    modules = {p.relative_to(REPO).as_posix() for p in (REPO / "navit_clip").rglob("*.py")}
    shipped = {p.relative_to(installed).as_posix() for p in (installed / "navit_clip").rglob("*.py")}
    assert modules - shipped == set(), "modules missing from the wheel: add their package to pyproject.toml"
    configs = {p.relative_to(REPO / "configs").as_posix() for p in (REPO / "configs").rglob("*")
               if p.suffix in {".yaml", ".json"}}
    packaged = {p.relative_to(installed / "navit_clip" / "configs").as_posix()
                for p in (installed / "navit_clip" / "configs").rglob("*") if p.is_file()}
    assert configs <= packaged


def test_installed_cli_and_configs_work_from_another_directory(installed: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    script = installed / "bin" / "navit-clip"
    out = _run([sys.executable, str(script), "train", "--help"], cwd=elsewhere, env=_env(installed))
    assert "--config" in out
    check = (
        "import navit_clip, navit_clip.config as c\n"
        f"assert navit_clip.__file__.startswith({str(installed)!r}), navit_clip.__file__\n"
        f"assert str(c.CONFIG_DIR).startswith({str(installed)!r}), c.CONFIG_DIR\n"
        "cfg = c.load_config(c.CONFIG_DIR / 'default.yaml')\n"
        "assert c.resolve_path(cfg.train.deepspeed).is_file(), cfg.train.deepspeed\n"
        "big = c.load_config(None, ['model.vision.preset=B/16'])  # the preset table ships too\n"
        "print(cfg.model.vision.width, big.model.vision.width, big.model.vision.patch_size)\n"
    )
    widths = _run([sys.executable, "-c", check], cwd=elsewhere, env=_env(installed)).split()
    assert widths == ["128", "768", "16"]
