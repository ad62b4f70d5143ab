"""Zero-shot evaluation: packed evaluation equals scoring every image on its own."""

from __future__ import annotations

import json

import pytest
import torch

from navit_clip.config import Config, ModelConfig, TextConfig, VisionConfig
from navit_clip.data.packing import pack
from navit_clip.data.patches import to_patched
from navit_clip.data.resolution import ResolutionPolicy
from navit_clip.data.shards import ReadStats, ShardSplit, expand_shards, read_samples
from navit_clip.data.text import CaptionTokenizer
from navit_clip.eval.zeroshot import ZeroShotTask, evaluate, load_task, text_classifier
from navit_clip.model.clip import NaViTCLIP

CLASSES = [f"class{i}" for i in range(7)]


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    cfg = Config()
    cfg.model = ModelConfig(vision=VisionConfig(patch_size=8, width=32, depth=1, heads=2, max_grid_side=32),
                            text=TextConfig(width=32, depth=1, heads=2, context_length=16), embed_dim=16)
    cfg.data.seq_len, cfg.data.max_images, cfg.eval.sequences_per_batch = 96, 5, 2
    cfg.data.resolution.max_tokens = 40
    return NaViTCLIP(cfg.model).eval(), cfg.validate()


def brute_force(model, cfg, shards, templates):
    """Every image alone in its own sequence, scored with the same classifier."""
    classifier = text_classifier(model, CLASSES, templates, torch.device("cpu"))
    policy = ResolutionPolicy(patch_size=8, max_tokens=cfg.data.resolution.max_tokens, max_side=32)
    tokenizer = CaptionTokenizer(16)
    top1 = top5 = n = 0
    for sample in read_samples(ShardSplit(tuple(expand_shards(shards))), ReadStats()):
        batch = pack([to_patched(sample, policy, tokenizer, None)], cfg.data.seq_len, cfg.data.max_images)
        with torch.no_grad():
            scores = model.encode_image_slots(batch)[batch.valid.flatten()][0] @ classifier.T
        ranked = scores.topk(5).indices.tolist()
        label = sample.meta["label"]
        top1 += ranked[0] == label
        top5 += label in ranked
        n += 1
    return top1 / n, top5 / n, n


def test_packed_evaluation_equals_per_image_scoring(setup, tiny_shards):
    model, cfg = setup
    templates = ["a photo of {}.", "{}"]
    task = ZeroShotTask(shards=tiny_shards.spec, class_names=CLASSES, templates=templates)
    result = evaluate(model, task, cfg, progress=False)
    acc1, acc5, n = brute_force(model, cfg, tiny_shards.spec, templates)
    assert result["num_images"] == n == tiny_shards.count
    assert result["acc1"] == pytest.approx(acc1) and result["acc5"] == pytest.approx(acc5)
    assert sum(v is not None for v in result["per_class_acc1"].values()) == len(set(tiny_shards.labels.values()))


def test_text_classifier_rows_are_unit_mean_of_prompts(setup):
    model, _ = setup
    rows = text_classifier(model, ["cat", "dog"], ["a {}", "the {}"], torch.device("cpu"))
    tokenizer = CaptionTokenizer(16)
    with torch.no_grad():
        cat = model.encode_text(torch.from_numpy(tokenizer(["a cat", "the cat"]))).mean(0)
    torch.testing.assert_close(rows[0], cat / cat.norm())
    torch.testing.assert_close(rows.norm(dim=-1), torch.ones(2))


def test_load_task_reads_dataset_json(tiny_shards):
    (tiny_shards.directory / "dataset.json").write_text(json.dumps({"class_names": CLASSES, "templates": ["{}!"]}))
    task = load_task(tiny_shards.spec, "dataset")
    assert task.class_names == CLASSES and task.templates == ["{}!"]
    assert len(load_task(tiny_shards.spec, "imagenet").templates) == 80
    with pytest.raises(ValueError, match="template set"):
        load_task(tiny_shards.spec, "nope")


def test_missing_dataset_json_is_named(tmp_path, tiny_shards):
    import shutil

    shutil.copy(tiny_shards.paths[0], tmp_path / "a.tar")
    with pytest.raises(FileNotFoundError, match="dataset.json"):
        load_task(str(tmp_path / "a.tar"))


def test_repeated_keys_and_bad_labels(setup, tmp_path):
    """Two shards written separately reuse keys; a label outside the classes is skipped, counted."""
    from PIL import Image

    from navit_clip.data.shard_files import write_shards

    def shard(name, labels):
        samples = []
        for i, label in enumerate(labels):
            img = Image.new("RGB", (24 + 8 * i, 16), (40 * i, 100, 200 - 30 * label if label >= 0 else 0))
            import io

            buf = io.BytesIO()
            img.save(buf, format="PNG")
            samples.append({"__key__": f"k{i}", "png": buf.getvalue(), "txt": "x", "json": {"label": label}})
        return write_shards(samples, str(tmp_path / f"{name}-%06d.tar"), max_per_shard=10)[0]

    a, b = shard("a", [0, 1, 2]), shard("b", [3, 4, 99])
    model, cfg = setup
    task = ZeroShotTask(shards=f"{a},{b}", class_names=CLASSES, templates=["{}"])
    result = evaluate(model, task, cfg, progress=False)
    assert result["num_images"] == 5 and result["skipped_samples"] == {"label_out_of_range": 1}
    assert sum(v is not None for v in result["per_class_acc1"].values()) == 5
