"""Zero-shot image-caption retrieval: every caption against every image, recall@k both ways
(CLIP_benchmark's definitions, see eval/metrics.py). Images may carry several captions."""

from __future__ import annotations

import logging

import torch

from navit_clip.errors import InputError
from navit_clip.eval.datasets import EvalDataset
from navit_clip.eval.embed import ImageEmbeddings, embed_images
from navit_clip.eval.metrics import retrieval_metrics
from navit_clip.eval.towers import Towers

log = logging.getLogger(__name__)


@torch.no_grad()
def encode_captions(towers: Towers, captions: list[str], chunk: int = 256) -> torch.Tensor:
    encode = towers.require_text()
    out = [encode(towers.tokenize(captions[i:i + chunk])).float().cpu()
           for i in range(0, len(captions), chunk)]
    return torch.cat(out)


def retrieve(towers: Towers, dataset: EvalDataset, budget: int | None = None, ks: tuple[int, ...] = (1, 5, 10),
             progress: bool = True, images: ImageEmbeddings | None = None) -> dict:
    """Recall@k of `towers` on the captioned images of `dataset` at `budget` tokens per image."""
    towers.require_text()
    images = images or embed_images(towers, dataset, budget, progress=progress, desc="retrieval")
    keep = [i for i, caps in enumerate(images.captions) if caps]
    skipped = images.stats.skipped.copy()
    if len(keep) < len(images.keys):
        skipped["no_caption"] += len(images.keys) - len(keep)
        log.warning("%d images without a caption are left out of retrieval", len(images.keys) - len(keep))
    if not keep:
        raise InputError(f"no image with a caption in {dataset.name}: retrieval needs captions")
    captions = [c for i in keep for c in images.captions[i]]
    text_image = torch.tensor([j for j, i in enumerate(keep) for _ in images.captions[i]])
    scores = encode_captions(towers, captions) @ images.emb[keep].T
    return {**retrieval_metrics(scores, text_image, ks), "num_images": len(keep), "num_captions": len(captions),
            "max_tokens_per_image": images.budget, "tokens_per_image": images.tokens_per_image,
            "images_per_second": images.images_per_second, "padding": images.padding,
            "skipped_samples": dict(skipped)}
