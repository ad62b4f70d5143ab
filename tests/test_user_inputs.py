"""Bad input to make-shards, export, eval and the command line: each is refused with one line that
names the file, key or option (exit status 2), and nothing half-made or private is left behind."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from navit_clip import cli
from navit_clip.config import ModelConfig, TextConfig, VisionConfig
from navit_clip.data.make_shards import Entry, encode_entry, make_shards, read_caption_file, read_image_folder
from navit_clip.data.shards import ReadStats, ShardSplit, read_samples
from navit_clip.errors import UserError
from navit_clip.export import export_image_encoder, load_image_encoder, load_text_encoder
from navit_clip.model.clip import NaViTCLIP

from conftest import make_tiny_image, write_tar

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "navit_clip", *args], capture_output=True, text=True, timeout=600,
                          cwd=REPO)


def png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), 90, np.uint8)).save(out, format="PNG")
    return out.getvalue()


def bomb(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels: beyond PIL's own limit (2 x 89.5 M pixels)
    Image.open raises DecompressionBombError before any check of ours runs."""
    data = bytearray(png(4, 4))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    images = tmp_path / "photos"
    (images / "sub").mkdir(parents=True)
    (images / "a.png").write_bytes(png(20, 10))
    (images / "sub" / "b.png").write_bytes(png(12, 12))
    (tmp_path / "outside.png").write_bytes(png(8, 8))
    return images


def sources(out: Path) -> list[str]:
    found = []
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            found += [json.loads(tar.extractfile(m).read())["source"] for m in tar.getmembers()
                      if m.name.endswith(".json")]
    return found


# make-shards ------------------------------------------------------------------------------------

def test_paths_outside_the_image_folder_are_refused_unless_allowed(photos, tmp_path, capsys):
    for name in ("../outside.png", str(tmp_path / "outside.png"), "sub/../../outside.png"):
        captions = tmp_path / "captions.csv"
        captions.write_text(f"file,caption\na.png,inside\n{name},escapes\n")
        with pytest.raises(UserError, match=r"captions.csv line 3: image path .* is outside --images"):
            list(read_caption_file(captions, photos))
        assert cli.main(["make-shards", "--images", str(photos), "--captions", str(captions),
                         "--out", str(tmp_path / "refused")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--allow-outside-images" in err
        assert not list((tmp_path / "refused").glob("*.tar"))
    out = tmp_path / "allowed"
    assert cli.main(["make-shards", "--images", str(photos), "--captions", str(captions), "--out", str(out),
                     "--allow-outside-images"]) == 0
    assert sources(out) == ["a.png", "outside.png"]  # an allowed outside path is stored by its file name


def test_shards_store_paths_relative_to_the_image_folder(photos, tmp_path):
    captions = tmp_path / "captions.jsonl"
    captions.write_text('{"file": "a.png", "caption": "one"}\n{"file": "./sub//b.png", "caption": "two"}\n')
    out = tmp_path / "shards"
    make_shards(read_caption_file(captions, photos), out)
    assert sources(out) == ["a.png", "sub/b.png"]
    (photos / "a.txt").write_text("one")
    (photos / "sub" / "b.txt").write_text("two")
    make_shards(read_image_folder(photos), out, overwrite=True)
    assert sources(out) == ["a.png", "sub/b.png"]
    for shard in out.glob("*.tar"):  # the user's folder names appear nowhere in the shards
        assert str(tmp_path).encode() not in shard.read_bytes()


def test_rerun_into_a_folder_with_shards_refuses_unless_overwrite(photos, tmp_path, capsys):
    captions = tmp_path / "c.csv"
    captions.write_text("file,caption\na.png,one\nsub/b.png,two\na.png,three\n")
    out = tmp_path / "shards"
    args = ["make-shards", "--images", str(photos), "--captions", str(captions), "--out", str(out)]
    assert cli.main([*args, "--per-shard", "1"]) == 0
    assert len(list(out.glob("*.tar"))) == 3
    (out / "notes.md").write_text("mine")
    capsys.readouterr()
    assert cli.main([*args, "--per-shard", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(out) in err and "--overwrite" in err
    assert len(list(out.glob("*.tar"))) == 3  # refused: nothing touched
    assert cli.main([*args, "--per-shard", "2", "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["notes.md", "shard-000000.tar", "shard-000001.tar", "sizes.json"]
    assert json.loads((out / "sizes.json").read_text()) == {"shard-000000.tar": 2, "shard-000001.tar": 1}
    (out / "dataset.json").write_text("{}")  # the digits dataset's summary counts as an earlier run too
    for p in out.glob("*.tar"):
        p.unlink()
    (out / "sizes.json").unlink()
    with pytest.raises(UserError, match="dataset.json"):
        make_shards(read_caption_file(captions, photos), out)


@pytest.mark.parametrize("value", ["0", "-3"])
def test_per_shard_must_be_positive(photos, tmp_path, capsys, value):
    captions = tmp_path / "c.csv"
    captions.write_text("file,caption\na.png,one\n")
    assert cli.main(["make-shards", "--images", str(photos), "--captions", str(captions),
                     "--out", str(tmp_path / "o"), "--per-shard", value]) == 2
    assert capsys.readouterr().err == f"navit-clip make-shards: error: --per-shard must be at least 1 " \
                                      f"(samples per shard), got {value}\n"
    assert not (tmp_path / "o").exists()


def test_output_folder_that_cannot_be_written_is_named(photos, tmp_path, capsys):
    captions = tmp_path / "c.csv"
    captions.write_text("file,caption\na.png,one\n")
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert cli.main(["make-shards", "--images", str(photos), "--captions", str(captions),
                     "--out", str(blocker / "shards")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"output folder {blocker / 'shards'} (--out)" in err
    import navit_clip.data.make_shards as make_shards_module

    def refuse(*_, **__):
        raise PermissionError(13, "Permission denied")

    with pytest.MonkeyPatch.context() as patch:  # what a read-only folder does to a user that is not root
        patch.setattr(make_shards_module.tempfile, "TemporaryFile", refuse)
        assert cli.main(["make-shards", "--images", str(photos), "--captions", str(captions),
                         "--out", str(tmp_path / "ro")]) == 2
    assert capsys.readouterr().err == (f"navit-clip make-shards: error: cannot write to the output folder "
                                       f"{tmp_path / 'ro'} (--out): Permission denied\n")
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    try:
        assert cli.main(["make-shards", "--images", str(photos), "--captions", str(captions),
                         "--out", str(locked)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"cannot write to the output folder {locked}" in err
    finally:
        locked.chmod(0o755)


def test_caption_file_not_utf8_names_file_and_line(photos, tmp_path):
    captions = tmp_path / "latin.csv"
    captions.write_bytes("file,caption\na.png,plain\nsub/b.png,caf\u00e9 au lait\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"latin.csv line 3 is not UTF-8 \(byte 0xe9\)"):
        list(read_caption_file(captions, photos))
    proc = run_cli("make-shards", "--images", str(photos), "--captions", str(captions), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr[-2000:]
    assert f"{captions} line 3 is not UTF-8" in proc.stderr


# decompression bombs ----------------------------------------------------------------------------

def test_decompression_bomb_is_image_too_large_in_shards_and_make_shards(tmp_path):
    """Beyond PIL's own limit the pixel count never reaches our check: PIL's refusal is the same
    reason, image_too_large, not an undecodable image."""
    path = write_tar(tmp_path / "bomb.tar", [("bomb.png", bomb(20000, 10000)), ("bomb.txt", b"bomb"),
                                             ("fine.png", png(8, 8)), ("fine.txt", b"fine")])
    stats = ReadStats()
    keys = [s.key for s in read_samples(ShardSplit((path,)), stats, max_pixels=10 ** 12)]
    assert keys == ["fine"] and dict(stats.skipped) == {"image_too_large": 1}
    (tmp_path / "bomb.png").write_bytes(bomb(20000, 10000))
    with pytest.raises(ValueError, match="^image_too_large$"):
        encode_entry(Entry(tmp_path / "bomb.png", "a bomb"), 0, 10 ** 12)


# export -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model() -> NaViTCLIP:
    torch.manual_seed(0)
    return NaViTCLIP(ModelConfig(vision=VisionConfig(patch_size=4, width=32, depth=2, heads=2, max_grid_side=16),
                                 text=TextConfig(width=32, depth=1, heads=2, context_length=8), embed_dim=16)).eval()


def export(model: NaViTCLIP, out: Path, **options) -> Path:
    return export_image_encoder(model, out, max_tokens_per_image=24, seq_len=48, max_images=4, **options)


def test_export_into_a_non_empty_folder_refuses_unless_overwrite(model, tmp_path):
    out = export(model, tmp_path / "export", with_text=True)
    (out / "image_encoder.pt2").write_bytes(b"an older program")
    with pytest.raises(UserError, match=r"export folder .* is not empty .*image_encoder.pt2.*--overwrite"):
        export(model, out)
    assert (out / "text.safetensors").exists()  # refused: the earlier export is whole
    export(model, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="notes.txt"):
        export(model, out, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine" and (out / "model.safetensors").exists()


def test_export_cli_refuses_an_earlier_export(tmp_path, tiny_shards, capsys):
    from test_cli import fake_run

    run = fake_run(tmp_path / "run", tiny_shards.spec)
    assert cli.main(["export", "--run", str(run)]) == 0
    (run / "export" / "image_encoder.pt2").write_bytes(b"stale")
    capsys.readouterr()
    assert cli.main(["export", "--run", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--overwrite" in err
    assert cli.main(["export", "--run", str(run), "--overwrite"]) == 0
    assert not (run / "export" / "image_encoder.pt2").exists()


@pytest.mark.parametrize("tower, key, value, fits", [
    ("image", "vision.width", 64, 32), ("image", "vision.depth", 3, 2), ("image", "vision.patch_size", 8, 4),
    ("image", "embed_dim", 32, 16), ("text", "text.depth", 2, 1), ("text", "text.width", 16, 32)])
def test_config_that_disagrees_with_the_weights_names_the_key(model, tmp_path, tower, key, value, fits):
    out = export(model, tmp_path / "export", with_text=True)
    config = json.loads((out / "config.json").read_text())
    *section, name = key.split(".")
    (config[section[0]] if section else config)[name] = value
    (out / "config.json").write_text(json.dumps(config))
    load = load_image_encoder if tower == "image" else load_text_encoder
    with pytest.raises(UserError) as raised:
        load(out)
    message = str(raised.value)
    assert "\n" not in message and len(message) < 400
    weights = "text.safetensors" if tower == "text" else "model.safetensors"
    assert message.startswith(f"{out / 'config.json'} does not match the weights in {weights}: ")
    assert f"check {key} (config.json: {value}, the weights fit {fits})" in message


def test_truncated_export_weights_name_the_file(model, tmp_path):
    out = export(model, tmp_path / "export")
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(UserError, match=rf"{weights} cannot be read \(truncated"):
        load_image_encoder(out)


# eval and the command line ----------------------------------------------------------------------

def test_eval_budgets_are_checked_before_any_evaluation(model, tmp_path, monkeypatch):
    from navit_clip.eval import run as eval_run

    out = export(model, tmp_path / "export", with_text=True)
    for i, (w, h) in enumerate([(40, 16), (16, 48)]):
        make_tiny_image(w, h, "RGB", i).save(tmp_path / f"{i}.png")
    (tmp_path / "pairs.csv").write_text("path,caption\n0.png,first\n1.png,second\n")
    evaluated: list[int] = []
    real = eval_run.retrieve
    monkeypatch.setattr(eval_run, "retrieve", lambda towers, data, budget, **kw: evaluated.append(budget)
                        or real(towers, data, budget, **kw))
    with pytest.raises(UserError, match=r"token budget 100000 \(--budgets or eval.max_tokens_per_image\) must be "
                                        r"in \[1, 48\]"):
        eval_run.run_eval(out, str(tmp_path / "pairs.csv"), budgets=[16, 100000], out=tmp_path / "sweep",
                          progress=False, device="cpu")
    assert evaluated == [] and not (tmp_path / "sweep").exists()
    proc = run_cli("eval", "--run", str(out), "--data", str(tmp_path / "pairs.csv"), "--budgets", "16,100000")
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr[-2000:]
    assert "token budget 100000" in proc.stderr


def test_options_may_follow_the_overrides(monkeypatch):
    seen = {}
    monkeypatch.setattr(cli, "train_command", lambda **options: seen.update(options))
    assert cli.main(["train", "a.b=1", "--resume", "never", "c.d=2", "--config", "x.yaml", "e.f=3"]) == 0
    assert seen == {"config_path": "x.yaml", "resume": "never", "overrides": ["a.b=1", "c.d=2", "e.f=3"]}
    with pytest.raises(SystemExit) as exited:  # an unknown option is still refused by argparse
        cli.main(["train", "a.b=1", "--bogus", "never"])
    assert exited.value.code == 2
    with pytest.raises(SystemExit):  # a command without overrides takes no stray words
        cli.main(["export", "--run", "r", "extra"])
