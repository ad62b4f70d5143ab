"""Evaluation on each data layout: image folder, CLIP_benchmark wds, path,caption CSV; packed
evaluation equals scoring every image alone; bad inputs are named."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_tiny_image, png_bytes, write_tar
from navit_clip.config import Config, ModelConfig, TextConfig, VisionConfig
from navit_clip.data.packing import pack
from navit_clip.data.patches import patch_image
from navit_clip.data.resolution import ResolutionPolicy
from navit_clip.data.shards import ReadStats
from navit_clip.data.text import CaptionTokenizer
from navit_clip.eval.datasets import open_dataset
from navit_clip.eval.retrieval import retrieve
from navit_clip.eval.towers import from_training_model
from navit_clip.eval.zeroshot import classify
from navit_clip.model.clip import NaViTCLIP

SIZES = [(40, 16), (16, 48), (24, 24), (64, 32), (20, 28), (48, 48), (32, 12), (12, 36), (56, 20), (28, 28)]
CLASSES = ["red square", "green", "blue", "grey", "yellow"]
BUDGET = 12


@pytest.fixture(scope="module")
def towers():
    torch.manual_seed(0)
    cfg = Config()
    cfg.model = ModelConfig(vision=VisionConfig(patch_size=4, width=32, depth=1, heads=2, max_grid_side=16),
                            text=TextConfig(width=32, depth=1, heads=2, context_length=16), embed_dim=16)
    cfg.data.seq_len, cfg.data.max_images, cfg.eval.sequences_per_batch, cfg.data.resolution.max_tokens = 48, 4, 2, 24
    model = NaViTCLIP(cfg.model).eval()
    with torch.no_grad():  # off the init, so that images and captions are told apart
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model, cfg.validate(), from_training_model(model, cfg)


def images():
    return [make_tiny_image(w, h, "RGB", seed) for seed, (w, h) in enumerate(SIZES)]


def captions_of(i: int) -> list[str]:
    return [f"picture {i} of a thing"] + ([f"another caption {i * 7}"] if i % 3 == 0 else [])


@torch.no_grad()
def alone(model, cfg, image: Image.Image) -> torch.Tensor:
    """The image's embedding when it is packed alone."""
    policy = ResolutionPolicy(patch_size=4, max_tokens=BUDGET, max_side=16)
    batch = pack([patch_image("x", image, policy, np.zeros(1, np.int64))], cfg.data.seq_len, cfg.data.max_images)
    return model.encode_image_slots(batch)[batch.valid.flatten()][0]


def reference_recalls(model, cfg, pictures, captions, k: int) -> tuple[float, float]:
    """Plain loops: each image alone, each caption alone, recall@k in both directions."""
    tokenizer = CaptionTokenizer(16)
    img = torch.stack([alone(model, cfg, p) for p in pictures])
    owners, texts = [], []
    for i, caps in enumerate(captions):
        for c in caps:
            owners.append(i)
            with torch.no_grad():
                texts.append(model.encode_text(torch.from_numpy(tokenizer([c])))[0])
    txt = torch.stack(texts)
    t2i = sum(owners[t] in (img @ txt[t]).argsort(descending=True)[:k].tolist() for t in range(len(texts)))
    i2t = sum(any(owners[t] == i for t in (txt @ img[i]).argsort(descending=True)[:k].tolist())
              for i in range(len(pictures)))
    return t2i / len(texts), i2t / len(pictures)


def write_csv(tmp_path, pictures) -> str:
    rows = ["path,caption"]
    for i, picture in enumerate(pictures):
        picture.save(tmp_path / f"img{i}.png")
        rows += [f"img{i}.png,{c}" for c in captions_of(i)]
    (tmp_path / "captions.csv").write_text("\n".join(rows) + "\n")
    return str(tmp_path / "captions.csv")


def test_retrieval_on_csv_and_wds_equals_plain_loops(towers, tmp_path):
    model, cfg, tw = towers
    pictures = images()
    captions = [captions_of(i) for i in range(len(pictures))]
    from_csv = retrieve(tw, open_dataset(write_csv(tmp_path, pictures)), BUDGET, ks=(1, 5), progress=False)
    for k in (1, 5):
        t2i, i2t = reference_recalls(model, cfg, pictures, captions, k)
        assert from_csv[f"image_retrieval_recall@{k}"] == pytest.approx(t2i)
        assert from_csv[f"text_retrieval_recall@{k}"] == pytest.approx(i2t)
    assert from_csv["num_images"] == 10 and from_csv["num_captions"] == 14
    assert 0 < from_csv["image_retrieval_recall@1"] < 1  # neither trivial nor hopeless

    # the same data in CLIP_benchmark's wds layout: txt holds one caption per line
    root = tmp_path / "wds"
    (root / "test").mkdir(parents=True)
    (root / "dataset_type.txt").write_text("retrieval\n")
    members = []
    for i, (picture, caps) in enumerate(zip(pictures, captions)):
        members += [(f"s{i:07d}.webp", _webp(picture)), (f"s{i:07d}.txt", "\n".join(caps).encode())]
    write_tar(root / "test" / "0.tar", members[:8])
    write_tar(root / "test" / "1.tar", members[8:])
    from_wds = retrieve(tw, open_dataset(str(root)), BUDGET, ks=(1, 5), progress=False)
    for key in ("image_retrieval_recall@1", "text_retrieval_recall@5"):
        assert from_wds[key] == pytest.approx(from_csv[key])


def _webp(picture: Image.Image) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="webp", lossless=True)
    return buffer.getvalue()


def brute_force_classes(model, cfg, pictures, labels, templates) -> tuple[float, float]:
    from navit_clip.eval.zeroshot import text_classifier

    classifier = text_classifier(model, CLASSES, templates, torch.device("cpu"))
    ranked = [(alone(model, cfg, p) @ classifier.T).argsort(descending=True).tolist() for p in pictures]
    acc1 = sum(r[0] == y for r, y in zip(ranked, labels)) / len(labels)
    recalls = [np.mean([r[0] == y for r, y in zip(ranked, labels) if y == c]) for c in sorted(set(labels))]
    return acc1, float(np.mean(recalls))


def test_image_folder_and_clip_benchmark_wds_classification(towers, tmp_path):
    model, cfg, tw = towers
    pictures, labels = images(), [i % 5 for i in range(10)]
    root = tmp_path / "folder"
    for i, (picture, label) in enumerate(zip(pictures, labels)):
        folder = root / CLASSES[label].replace(" ", "_")
        folder.mkdir(parents=True, exist_ok=True)
        picture.save(folder / f"{i}.png")
    (tmp_path / "names.txt").write_text("\n".join(CLASSES) + "\n")
    (tmp_path / "prompts.txt").write_text("a photo of {c}.\n{c}\n")
    dataset = open_dataset(str(root), class_names_file=str(tmp_path / "names.txt"))
    assert dataset.class_names == CLASSES
    got = classify(tw, dataset, ["a photo of {c}.", "{c}"], BUDGET, progress=False)
    acc1, mean_recall = brute_force_classes(model, cfg, pictures, labels, ["a photo of {}.", "{}"])
    assert got["acc1"] == pytest.approx(acc1) and got["mean_per_class_recall"] == pytest.approx(mean_recall)
    assert got["num_images"] == 10 and got["acc5"] == 1.0  # 5 classes: every label is in the top 5

    # CLIP_benchmark wds: split/N.tar with cls labels, classnames.txt, templates with {c}
    wds = tmp_path / "wds"
    (wds / "test").mkdir(parents=True)
    (wds / "classnames.txt").write_text("\n".join(CLASSES) + "\n")
    (wds / "zeroshot_classification_templates.txt").write_text("a photo of {c}.\n{c}\n")
    members = []
    for i, (picture, label) in enumerate(zip(pictures, labels)):
        members += [(f"s{i:07d}.png", png_bytes(picture)), (f"s{i:07d}.cls", str(label).encode())]
    write_tar(wds / "test" / "0.tar", members)
    wds_set = open_dataset(str(wds))
    assert wds_set.kind == "classification" and wds_set.templates == ["a photo of {c}.", "{c}"]
    from_wds = classify(tw, wds_set, wds_set.templates, BUDGET, progress=False)
    assert from_wds["acc1"] == pytest.approx(got["acc1"])
    assert from_wds["per_class_acc1"] == pytest.approx(got["per_class_acc1"])


def test_bad_inputs_are_named(towers, tmp_path, caplog):
    _, _, tw = towers
    root = tmp_path / "folder"
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        make_tiny_image(20, 20, "RGB", 0).save(root / name / "a.png")
    (root / "dog" / "broken.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "names.txt").write_text("cat\ndog\nzebra\n")
    with pytest.raises(FileNotFoundError, match="class folder for 'zebra' is missing"):
        open_dataset(str(root), class_names_file=str(tmp_path / "names.txt"))
    dataset = open_dataset(str(root))
    assert dataset.class_names == ["cat", "dog"]
    stats = ReadStats()
    with caplog.at_level(logging.WARNING):
        items = list(dataset.read(stats))
    assert len(items) == 2 and stats.skipped == {"unreadable_image": 1}
    assert "broken.png" in caplog.text
    result = classify(tw, dataset, ["{c}"], BUDGET, progress=False)
    assert result["num_images"] == 2 and result["skipped_samples"] == {"unreadable_image": 1}

    (tmp_path / "no_caption.csv").write_text("path,text\na.png,x\n")
    with pytest.raises(ValueError, match="path,caption"):
        open_dataset(str(tmp_path / "no_caption.csv"))
    (tmp_path / "missing.csv").write_text("path,caption\nnowhere.png,x\n")
    with pytest.raises(FileNotFoundError, match="nowhere.png"):
        open_dataset(str(tmp_path / "missing.csv"))
    wds = tmp_path / "wds"
    (wds / "train").mkdir(parents=True)
    write_tar(wds / "train" / "0.tar", [("s0.png", png_bytes(make_tiny_image(8, 8, "RGB", 0))), ("s0.cls", b"0")])
    (wds / "classnames.txt").write_text("a\n")
    with pytest.raises(FileNotFoundError, match=r"splits with shards: \['train'\]"):
        open_dataset(str(wds), split="test")
    with pytest.raises(ValueError, match="no prompt templates"):
        from navit_clip.eval.zeroshot import resolve_templates

        resolve_templates(None, open_dataset(str(wds), split="train"))
    with pytest.raises(ValueError, match="token budget 999"):
        classify(tw, dataset, ["{c}"], 999, progress=False)


def test_zero_shot_from_the_export_alone_equals_the_training_model(towers, tmp_path):
    from navit_clip.eval.towers import load_towers
    from navit_clip.export import export_image_encoder

    model, cfg, tw = towers
    root = tmp_path / "folder"
    for i, picture in enumerate(images()):
        (root / CLASSES[i % 5]).mkdir(parents=True, exist_ok=True)
        picture.save(root / CLASSES[i % 5] / f"{i}.png")
    export = export_image_encoder(model, tmp_path / "export", max_tokens_per_image=24, seq_len=cfg.data.seq_len,
                                  max_images=cfg.data.max_images, with_text=True)
    dataset = open_dataset(str(root))
    from_run = classify(tw, dataset, ["a photo of {c}."], BUDGET, progress=False)
    from_export = classify(load_towers(export), dataset, ["a photo of {c}."], BUDGET, progress=False)
    for key in ("acc1", "acc5", "mean_per_class_recall", "num_images"):
        assert from_export[key] == pytest.approx(from_run[key])
