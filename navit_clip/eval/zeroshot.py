"""Zero-shot classification: class names × prompt templates -> text classifier; images are packed
at the chosen token budget and scored against it. Reports top-1 and top-5 accuracy."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

from navit_clip.config import Config
from navit_clip.data.loader import to_patched
from navit_clip.data.packing import StreamingPacker
from navit_clip.data.resolution import ResolutionPolicy
from navit_clip.data.shards import ReadStats, ShardSplit, expand_shards, read_samples
from navit_clip.data.text import CaptionTokenizer
from navit_clip.model.clip import NaViTCLIP

log = logging.getLogger(__name__)

Template = str | Callable[[str], str]


@dataclass
class ZeroShotTask:
    shards: str
    class_names: list[str]
    templates: list[Template]
    label_key: str = "label"
    num_images: int | None = None  # for the progress bar, when known


def load_task(shards: str, templates: str = "dataset") -> ZeroShotTask:
    """Class names (and the dataset's own templates) come from dataset.json beside the shards;
    `templates="imagenet"` uses open_clip's 80 ImageNet prompts instead."""
    first = Path(expand_shards(shards)[0])
    info_path = first.parent / "dataset.json"
    if not info_path.exists():
        raise FileNotFoundError(f"zero-shot evaluation needs {info_path} with 'class_names' (and 'templates')")
    info = json.loads(info_path.read_text())
    if "class_names" not in info:
        raise ValueError(f"{info_path} has no 'class_names'")
    if templates == "imagenet":
        from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

        chosen: list[Template] = list(OPENAI_IMAGENET_TEMPLATES)
    elif templates == "dataset":
        if not info.get("templates"):
            raise ValueError(f"{info_path} has no 'templates'; use eval.templates=imagenet")
        chosen = list(info["templates"])
    else:
        raise ValueError(f"unknown template set {templates!r} (dataset or imagenet)")
    return ZeroShotTask(shards=shards, class_names=list(info["class_names"]), templates=chosen,
                        num_images=info.get("num_eval"))


def _fill(template: Template, name: str) -> str:
    return template(name) if callable(template) else template.format(name)


@torch.no_grad()
def text_classifier(model: NaViTCLIP, class_names: Sequence[str], templates: Sequence[Template],
                    device: torch.device) -> torch.Tensor:
    """[C, D]: for each class, the normalized mean of its normalized prompt embeddings."""
    tokenizer = CaptionTokenizer(model.cfg.text.context_length)
    weights = []
    for name in class_names:
        tokens = torch.from_numpy(tokenizer([_fill(t, name) for t in templates])).to(device)
        mean = model.encode_text(tokens).mean(dim=0)
        weights.append(mean / mean.norm())
    return torch.stack(weights)


def _labelled_images(task: ZeroShotTask, policy: ResolutionPolicy, text_len: int,
                     labels: dict[str, int], stats: ReadStats) -> Iterator:
    tokenizer = CaptionTokenizer(text_len)
    num_classes = len(task.class_names)
    for index, sample in enumerate(read_samples(ShardSplit(tuple(expand_shards(task.shards))), stats)):
        label = sample.meta.get(task.label_key)
        if not isinstance(label, int) or not 0 <= label < num_classes:
            reason = "no_label" if label is None else "label_out_of_range"
            stats.skipped[reason] += 1
            log.warning("skipping eval sample %s: %s %r", sample.key, reason, label)
            continue
        image = to_patched(sample, policy, tokenizer, rng=None)
        image.key = f"{index}/{sample.key}"  # sample keys may repeat across shards; this cannot
        labels[image.key] = label
        yield image


@torch.no_grad()
def evaluate(model: NaViTCLIP, task: ZeroShotTask, cfg: Config, device: torch.device | str = "cpu",
             max_tokens: int | None = None, progress: bool = True) -> dict:
    """Zero-shot top-1/top-5 accuracy of `model` on `task` at a token budget per image."""
    device = torch.device(device)
    model.eval()
    budget = max_tokens or cfg.eval.max_tokens_per_image or cfg.data.max_tokens_per_image
    classifier = text_classifier(model, task.class_names, task.templates, device)
    policy = ResolutionPolicy(patch_size=cfg.model.vision.patch_size, max_tokens=budget,
                              max_side=cfg.model.vision.max_grid_side)
    packer = StreamingPacker(seq_len=cfg.data.seq_len, max_images=cfg.data.max_images,
                             sequences_per_batch=cfg.eval.sequences_per_batch, open_sequences=cfg.data.open_sequences)
    labels: dict[str, int] = {}
    stats = ReadStats()
    k = min(5, len(task.class_names))
    correct1 = correct5 = total = 0
    per_class = np.zeros((len(task.class_names), 2), dtype=np.int64)  # [correct top-1, count]
    images = _labelled_images(task, policy, cfg.model.text.context_length, labels, stats)
    bar = tqdm(total=task.num_images, desc="zero-shot", unit="img", disable=not progress, dynamic_ncols=True)
    for batch in packer.pack_stream(images, flush=True):
        keys = [key for key in batch.flat_keys() if key is not None]
        emb = model.encode_image_slots(batch.to(device))[batch.valid.flatten().to(device)]
        target = torch.tensor([labels[key] for key in keys], device=device)
        topk = (emb @ classifier.T).topk(k, dim=-1).indices
        hit1 = topk[:, 0] == target
        correct1 += int(hit1.sum())
        correct5 += int((topk == target[:, None]).any(dim=-1).sum())
        total += len(keys)
        np.add.at(per_class, (target.cpu().numpy(), 0), hit1.cpu().numpy().astype(np.int64))
        np.add.at(per_class, (target.cpu().numpy(), 1), 1)
        bar.update(len(keys))
    bar.close()
    if total == 0:
        raise RuntimeError(f"no labelled image in {task.shards} (skipped: {dict(stats.skipped)})")
    return {
        "acc1": correct1 / total,
        "acc5": correct5 / total,
        "num_images": total,
        "num_classes": len(task.class_names),
        "chance_acc1": 1 / len(task.class_names),
        "num_templates": len(task.templates),
        "max_tokens_per_image": budget,
        "padding": packer.padding_fraction,
        "skipped_samples": dict(stats.skipped),
        "per_class_acc1": {name: float(c / n) if n else None
                           for name, (c, n) in zip(task.class_names, per_class.tolist())},
    }
