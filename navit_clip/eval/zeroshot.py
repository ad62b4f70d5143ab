"""Zero-shot classification: class names × prompt templates -> text classifier (each class the
normalized mean of its normalized prompt embeddings); images are packed at the chosen token
budget and scored against it. Reports CLIP_benchmark's acc1, acc5 and mean per-class recall."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from navit_clip.config import TEMPLATE_SETS, Config
from navit_clip.data.shards import expand_shards
from navit_clip.data.text import cached_tokenizer
from navit_clip.errors import InputError, MissingInputError
from navit_clip.eval.datasets import EvalDataset, navit_shards, read_lines
from navit_clip.eval.embed import ImageEmbeddings, embed_images
from navit_clip.eval.metrics import classification_metrics
from navit_clip.eval.towers import Towers, from_training_model

log = logging.getLogger(__name__)

Template = str | Callable[[str], str]


def resolve_templates(spec: str | None, dataset: EvalDataset) -> list[Template]:
    """`dataset` (or None): the dataset's own prompts; `imagenet`: open_clip's 80 ImageNet
    prompts; anything else: a file with one prompt per line, `{c}` or `{}` for the class name."""
    if spec in (None, "", "dataset"):
        if not dataset.templates:
            raise InputError(f"dataset {dataset.name} has no prompt templates; pass --templates imagenet "
                             "(eval.templates=imagenet) or a file with one template per line")
        return list(dataset.templates)
    if spec == "imagenet":
        from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

        return list(OPENAI_IMAGENET_TEMPLATES)
    path = Path(spec)
    if not path.is_file():
        raise MissingInputError(f"template set {spec!r} is neither dataset, imagenet nor a file")
    templates = read_lines(path)
    if not templates:
        raise InputError(f"template file {path} is empty")
    return templates


def fill(template: Template, name: str) -> str:
    return template(name) if callable(template) else template.format(name, c=name)


@torch.no_grad()
def text_classifier(model, class_names: Sequence[str], templates: Sequence[Template],
                    device: torch.device | None = None) -> torch.Tensor:
    """[C, D]: for each class, the normalized mean of its normalized prompt embeddings. `model` is
    Towers or anything with `encode_text` and `cfg.text` (a NaViTCLIP)."""
    if isinstance(model, Towers):
        encode, context_length, device = model.require_text(), model.context_length, model.device
        tokenizer = cached_tokenizer(model.tokenizer, context_length)
    else:
        encode, text = model.encode_text, model.cfg.text
        tokenizer = cached_tokenizer(text.tokenizer, text.context_length)
    weights = []
    for name in class_names:
        tokens = torch.from_numpy(tokenizer([fill(t, name) for t in templates])).to(device)
        mean = encode(tokens).float().mean(dim=0)
        weights.append(mean / mean.norm())
    return torch.stack(weights)


def classify(towers: Towers, dataset: EvalDataset, templates: Sequence[Template], budget: int | None = None,
             progress: bool = True, images: ImageEmbeddings | None = None) -> dict:
    """Zero-shot classification metrics of `towers` on `dataset` at `budget` tokens per image
    (pass `images` to reuse embeddings already computed at that budget)."""
    if dataset.kind != "classification" or not dataset.class_names:
        raise InputError(f"dataset {dataset.name} is a {dataset.kind} dataset without class names")
    classifier = text_classifier(towers, dataset.class_names, templates).cpu()
    images = images or embed_images(towers, dataset, budget, progress=progress, desc="zero-shot")
    num_classes = len(dataset.class_names)
    keep, skipped = [], images.stats.skipped.copy()
    for index, (key, label) in enumerate(zip(images.keys, images.labels)):
        if isinstance(label, int) and 0 <= label < num_classes:
            keep.append(index)
            continue
        reason = "no_label" if label is None else "label_out_of_range"
        skipped[reason] += 1
        log.warning("skipping eval sample %s: %s %r", key, reason, label)
    if not keep:
        raise InputError(f"no labelled image in {dataset.name} (skipped: {dict(skipped)})")
    target = torch.tensor([images.labels[i] for i in keep])
    metrics = classification_metrics(images.emb[keep] @ classifier.T, target)
    return {
        "acc1": metrics["acc1"], "acc5": metrics["acc5"], "mean_per_class_recall": metrics["mean_per_class_recall"],
        "num_images": len(keep), "num_classes": num_classes, "chance_acc1": 1 / num_classes,
        "num_templates": len(templates), "max_tokens_per_image": images.budget,
        "tokens_per_image": images.tokens_per_image, "images_per_second": images.images_per_second,
        "padding": images.padding, "skipped_samples": dict(skipped),
        "per_class_acc1": dict(zip(dataset.class_names, metrics["per_class_recall"])),
    }


# ---------------------------------------------------------------------------------------------
# the training-side entry: shards with dataset.json, a NaViTCLIP and its Config
# ---------------------------------------------------------------------------------------------

@dataclass
class ZeroShotTask:
    shards: str
    class_names: list[str]
    templates: list[Template]
    num_images: int | None = None  # for the progress bar, when known


def load_task(shards: str, templates: str = "dataset") -> ZeroShotTask:
    """Class names (and the dataset's own templates) come from dataset.json beside the shards;
    `templates="imagenet"` uses open_clip's 80 ImageNet prompts instead."""
    info_path = Path(expand_shards(shards)[0]).parent / "dataset.json"
    if not info_path.exists():
        raise MissingInputError(f"zero-shot evaluation needs {info_path} with 'class_names' (and 'templates')")
    info = json.loads(info_path.read_text())
    if "class_names" not in info:
        raise InputError(f"{info_path} has no 'class_names'")
    if templates not in TEMPLATE_SETS:
        raise InputError(f"unknown template set {templates!r} (one of {', '.join(TEMPLATE_SETS)})")
    dataset = navit_shards(shards)
    return ZeroShotTask(shards=shards, class_names=list(info["class_names"]),
                        templates=resolve_templates(templates, dataset), num_images=info.get("num_eval"))


def evaluate(model, task: ZeroShotTask, cfg: Config, device: torch.device | str = "cpu",
             max_tokens: int | None = None, progress: bool = True) -> dict:
    """Zero-shot metrics of a NaViTCLIP on `task` at a token budget per image (default: the
    eval budget of the config, else the training budget)."""
    towers = from_training_model(model, cfg, device)
    dataset = navit_shards(task.shards)
    dataset.class_names, dataset.kind, dataset.size = list(task.class_names), "classification", task.num_images
    return classify(towers, dataset, task.templates, max_tokens or cfg.eval.max_tokens_per_image or None, progress)
