"""The bundled objects dataset: built the same from the same seed, captions that name exactly the
objects drawn (checked against the drawing's record and the pixels), test sets of the right
counts and classes, zero-shot prompts in words no training caption uses, and `navit-clip eval`
running zero-shot and retrieval on it."""

from __future__ import annotations

import io
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from braceexpand import braceexpand
from PIL import Image

from navit_clip.cli import main, parse_command_line
from navit_clip.data.object_captions import BACKGROUNDS, COLOURS, COUNTS, EVAL_TEMPLATES, train_caption
from navit_clip.data.objects import CLASS_NAMES, make_object_shards
from navit_clip.data.shard_files import read_raw
from navit_clip.data.shards import ReadStats
from navit_clip.eval.datasets import open_dataset

SMALL = dict(num_train=60, eval_per_class=3, num_retrieval=40, shards_train=2, shards_eval=2)
NAME = re.compile(r"\b(" + "|".join(sorted(CLASS_NAMES, key=len, reverse=True)) + r")\b")
COLOUR_WORDS = "|".join(COLOURS)


def samples(spec: str) -> list[dict]:
    out = []
    for raw in read_raw(list(braceexpand(spec)), ReadStats()):
        out.append({"key": raw["__key__"], "jpg": raw["jpg"], "txt": raw["txt"].decode("utf-8"),
                    "meta": json.loads(raw["json"].decode("utf-8"))})
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    info = make_object_shards(tmp_path_factory.mktemp("objects"), seed=3, **SMALL)
    return {"info": info, **{part: samples(info[f"{part}_shards"]) for part in ("train", "eval", "retrieval")}}


def test_same_seed_same_samples_other_seed_others(built, tmp_path):
    again = make_object_shards(tmp_path / "again", seed=3, **SMALL)
    other = make_object_shards(tmp_path / "other", seed=4, **SMALL)
    for part in ("train", "eval", "retrieval"):
        repeat = samples(again[f"{part}_shards"])
        assert [(s["key"], s["jpg"], s["txt"], s["meta"]) for s in repeat] == \
               [(s["key"], s["jpg"], s["txt"], s["meta"]) for s in built[part]]
        assert [s["jpg"] for s in samples(other[f"{part}_shards"])[:5]] != [s["jpg"] for s in repeat[:5]]


def test_dataset_json_and_counts(built):
    info = built["info"]
    root = Path(info["train_shards"]).parent
    sizes = json.loads((root / "sizes.json").read_text())
    assert json.loads((root / "dataset.json").read_text()) == json.loads(json.dumps(info))
    assert info["class_names"] == list(CLASS_NAMES) and len(set(CLASS_NAMES)) == 20
    for part, n in (("train", 60), ("eval", 60), ("retrieval", 40)):
        files = [Path(p).name for p in braceexpand(info[f"{part}_shards"])]
        assert len(built[part]) == n == info[f"num_{part}"] == sum(sizes[f] for f in files)
    assert Counter(len(s["meta"]["objects"]) for s in built["train"]).keys() <= {1, 2, 3}


def test_captions_name_exactly_the_objects_drawn(built):
    for sample in built["train"] + built["retrieval"]:
        caption, objects = sample["txt"], sample["meta"]["objects"]
        assert Counter(NAME.findall(caption)) == Counter(o["class_name"] for o in objects), caption
        assert len({o["class_name"] for o in objects}) == len(objects)  # different objects on a canvas
        for colour, name in re.findall(rf"\b({COLOUR_WORDS}) (?:({'|'.join(CLASS_NAMES)})\b)", caption):
            assert any(o["colour"] == colour and o["class_name"] == name for o in objects), caption
        for count, words in COUNTS.items():
            if words in caption:
                assert len(objects) == count, caption
        if "background" in caption:
            assert f"on a {sample['meta']['background']} background" in caption


def test_the_pixels_show_what_the_record_says(built):
    """Each recorded box holds ink of its object's colour; outside every box the canvas is background."""
    for sample in built["train"][:30] + built["eval"][:20]:
        image = np.asarray(Image.open(io.BytesIO(sample["jpg"])).convert("RGB"), dtype=np.float32)
        meta = sample["meta"]
        assert image.shape[:2] == (meta["height"], meta["width"])
        outside = np.ones(image.shape[:2], bool)
        for o in meta["objects"]:
            x0, y0, x1, y1 = o["box"]
            assert 0 <= x0 < x1 <= meta["width"] and 0 <= y0 < y1 <= meta["height"]
            ink = np.linalg.norm(image[y0:y1, x0:x1] - np.array(COLOURS[o["colour"]]), axis=-1) < 40
            assert ink.mean() > 0.05, (sample["key"], o)
            outside[y0:y1, x0:x1] = False
        background = np.linalg.norm(image[outside] - np.array(BACKGROUNDS[meta["background"]]), axis=-1)
        assert np.quantile(background, 0.99) < 60, sample["key"]  # a gradient strays at most ~35 from it


def test_single_object_test_set(built):
    per_class = Counter(s["meta"]["label"] for s in built["eval"])
    assert per_class == {label: 3 for label in range(len(CLASS_NAMES))}
    for s in built["eval"]:
        (obj,) = s["meta"]["objects"]
        assert obj["label"] == s["meta"]["label"] and s["txt"] == CLASS_NAMES[obj["label"]] == obj["class_name"]
    dataset = open_dataset(built["info"]["eval_shards"])
    assert dataset.kind == "classification" and dataset.class_names == list(CLASS_NAMES)
    assert dataset.templates == list(EVAL_TEMPLATES) and dataset.size == 60


def test_retrieval_test_set(built):
    captions = [s["txt"] for s in built["retrieval"]]
    assert len(set(captions)) == len(captions)
    for s in built["retrieval"]:
        objects = sorted(s["meta"]["objects"], key=lambda o: o["box"][0] + o["box"][2])
        assert 2 <= len(objects) <= 3
        named = re.findall(rf"\b({COLOUR_WORDS}) (?:scissors|({'|'.join(CLASS_NAMES)}))\b", s["txt"])
        assert [(c, n or "scissors") for c, n in named] == [(o["colour"], o["class_name"]) for o in objects]
    dataset = open_dataset(built["info"]["retrieval_shards"])
    assert dataset.kind == "retrieval" and dataset.size == 40
    assert open_dataset(built["info"]["train_shards"]).kind == "classification"


def test_prompts_share_no_word_with_training_captions():
    """Beyond the class name and a/an, no word of a zero-shot prompt occurs in a training caption
    (many captions drawn from every wording, colour and background)."""
    rng = np.random.default_rng(0)
    words: set[str] = set()
    for _ in range(4000):
        count = int(rng.integers(1, 4))
        labels = rng.choice(len(CLASS_NAMES), size=count, replace=False)
        meta = {"background": str(rng.choice(list(BACKGROUNDS))),
                "objects": [{"class_name": CLASS_NAMES[k], "colour": str(rng.choice(list(COLOURS))),
                             "box": [int(x), 0, int(x) + 5, 5]} for k, x in zip(labels, rng.permutation(50))]}
        words |= set(re.findall(r"[a-z-]+", train_caption(meta, rng)))
    assert {"side", "left", "background", "picture", "objects"} <= words  # every kind of wording was drawn
    class_words = {w for name in CLASS_NAMES for w in name.split()}
    prompt_words = {w for t in EVAL_TEMPLATES for w in re.findall(r"[a-z-]+", t)} - {"a", "an"}
    assert prompt_words and not prompt_words & words and not prompt_words & class_words


def test_make_shards_cli_default_folder(monkeypatch, tmp_path):
    options = parse_command_line(["make-shards", "--dataset", "objects"])
    assert options["dataset"] == "objects" and options["out"] is None
    assert parse_command_line(["make-shards"])["dataset"] == "digits"
    with pytest.raises(SystemExit):
        parse_command_line(["make-shards", "--dataset", "cats"])
    calls = {}
    monkeypatch.setattr("navit_clip.data.objects.make_object_shards",
                        lambda out, seed: calls.update(out=out, seed=seed) or {"num_train": 0, "num_eval": 0,
                                                                                "num_retrieval": 0})
    monkeypatch.chdir(tmp_path)
    assert main(["make-shards", "--dataset", "objects", "--seed", "5"]) in (0, None)
    assert calls == {"out": "data/objects", "seed": 5}


def test_eval_cli_zero_shot_and_retrieval(built, tmp_path):
    """An untrained model exported with its text tower: zero-shot on the single-object set with
    the dataset's prompts, retrieval on the multi-object set, each chosen from dataset.json."""
    from navit_clip.config import ModelConfig, TextConfig, VisionConfig
    from navit_clip.export import export_image_encoder
    from navit_clip.model.clip import NaViTCLIP

    torch.manual_seed(0)
    model = NaViTCLIP(ModelConfig(vision=VisionConfig(patch_size=8, width=32, depth=1, heads=2, max_grid_side=32),
                                  text=TextConfig(width=32, depth=1, heads=2, context_length=32), embed_dim=16))
    export = export_image_encoder(model.eval(), tmp_path / "export", max_tokens_per_image=32, seq_len=64,
                                  max_images=4, with_text=True)
    info = built["info"]
    assert main(["eval", "--run", str(export), "--data", info["eval_shards"], "--out", str(tmp_path / "zs.json")]) \
        in (0, None)
    zeroshot = json.loads((tmp_path / "zs.json").read_text())
    assert zeroshot["task"] == "zeroshot_classification" and zeroshot["dataset"] == "navit-clip-objects"
    assert 0 <= zeroshot["metrics"]["acc1"] <= zeroshot["metrics"]["acc5"] <= 1
    assert main(["eval", "--run", str(export), "--data", info["retrieval_shards"], "--out", str(tmp_path / "r.json")]) \
        in (0, None)
    retrieval = json.loads((tmp_path / "r.json").read_text())
    assert retrieval["task"] == "zeroshot_retrieval"
    for direction in ("image", "text"):
        r1, r5 = (retrieval["metrics"][f"{direction}_retrieval_recall@{k}"] for k in (1, 5))
        assert 0 <= r1 <= r5 <= 1
