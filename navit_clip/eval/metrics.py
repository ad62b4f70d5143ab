"""Zero-shot metrics with CLIP_benchmark's names and definitions, on plain tensors.

Classification: acc1, acc5 (None with fewer than 5 classes, where it would be trivially 1), and
mean per-class recall (balanced accuracy over the classes that occur). Retrieval: recall@k in
both directions, where an image may have several captions: `image_retrieval_recall@k` is, over
captions, whether one of the k best images is the caption's image (text -> image);
`text_retrieval_recall@k` is, over images, whether one of the k best captions is one of its own
(image -> text).
"""

from __future__ import annotations

from typing import Sequence

import torch


def classification_metrics(scores: torch.Tensor, target: torch.Tensor) -> dict:
    """scores [n, C], target [n] int -> acc1, acc5, mean_per_class_recall, per-class recall."""
    if scores.ndim != 2 or target.shape != scores.shape[:1]:
        raise ValueError(f"scores must be [n, C] and target [n], got {tuple(scores.shape)} and {tuple(target.shape)}")
    n, num_classes = scores.shape
    if n == 0:
        raise ValueError("no scored image: cannot compute classification metrics")
    target = target.to(scores.device)
    order = scores.topk(min(5, num_classes), dim=-1).indices
    hit1 = order[:, 0] == target
    counts = torch.bincount(target, minlength=num_classes)
    correct = torch.bincount(target[hit1], minlength=num_classes)
    present = counts > 0
    recall = correct[present].double() / counts[present].double()
    return {
        "acc1": float(hit1.double().mean()),
        "acc5": float((order == target[:, None]).any(dim=-1).double().mean()) if num_classes >= 5 else None,
        "mean_per_class_recall": float(recall.mean()),
        "per_class_recall": [float(c) / int(k) if k else None for c, k in zip(correct.tolist(), counts.tolist())],
    }


def retrieval_metrics(scores: torch.Tensor, text_image: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict:
    """scores [n_texts, n_images] (caption x image similarity), text_image [n_texts]: the image
    index of each caption -> {image_retrieval_recall@k, text_retrieval_recall@k} for each k."""
    n_texts, n_images = scores.shape
    if n_texts == 0 or n_images == 0:
        raise ValueError("retrieval needs at least one image and one caption")
    if text_image.shape != (n_texts,):
        raise ValueError(f"text_image must be [{n_texts}], got {tuple(text_image.shape)}")
    text_image = text_image.to(scores.device)
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(n_texts, device=scores.device), text_image] = True
    has_caption = positive.any(dim=0)
    out = {}
    for k in ks:
        best_images = scores.topk(min(k, n_images), dim=1).indices  # [n_texts, k]
        text_to_image = (best_images == text_image[:, None]).any(dim=1)
        best_texts = scores.T.topk(min(k, n_texts), dim=1).indices  # [n_images, k]
        image_to_text = positive.T.gather(1, best_texts).any(dim=1)[has_caption]
        out[f"image_retrieval_recall@{k}"] = float(text_to_image.double().mean())
        out[f"text_retrieval_recall@{k}"] = float(image_to_text.double().mean())
    return out
