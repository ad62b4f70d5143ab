"""Embed every image of an evaluation set at a token budget, packed exactly as in training
(native aspect ratio, shrunk to the budget, or a square model's R×R square at the budget;
streamed through the best-fit packer), and keep the embeddings in the dataset's order together
with each image's label and captions."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from navit_clip.data.packing import StreamingPacker
from navit_clip.data.patches import patch_image
from navit_clip.data.shards import ReadStats
from navit_clip.errors import InputError
from navit_clip.eval.datasets import EvalDataset
from navit_clip.eval.towers import Towers


@dataclass
class ImageEmbeddings:
    emb: torch.Tensor  # [n, D], dataset order, on the CPU
    keys: list[str]
    labels: list[int | None]
    captions: list[list[str]]
    budget: int
    tokens: int  # image tokens (patches) encoded, padding excluded
    encode_seconds: float  # time spent in the image tower only
    padding: float  # share of packed positions that were padding
    stats: ReadStats = field(default_factory=ReadStats)

    @property
    def tokens_per_image(self) -> float:
        return self.tokens / max(1, len(self.keys))

    @property
    def images_per_second(self) -> float:
        return len(self.keys) / self.encode_seconds if self.encode_seconds > 0 else float("nan")


def check_budget(towers: Towers, budget: int | None) -> int:
    """The budget to embed at (None: the training budget); one image must fit one packed sequence."""
    budget = budget or towers.max_tokens_per_image
    if not 1 <= budget <= towers.seq_len:
        raise InputError(f"token budget {budget} (--budgets or eval.max_tokens_per_image) must be in "
                         f"[1, {towers.seq_len}], the packed sequence length (data.seq_len) of {towers.name}")
    return budget


@torch.no_grad()
def embed_images(towers: Towers, dataset: EvalDataset, budget: int | None = None, *, progress: bool = True,
                 desc: str = "images") -> ImageEmbeddings:
    budget = check_budget(towers, budget)
    if towers.encode_images is not None:
        return _embed_whole_images(towers, dataset, budget, progress, desc)
    policy = towers.sizing.policy(patch_size=towers.patch_size, max_side=towers.max_side, max_tokens=budget)
    packer = StreamingPacker(seq_len=towers.seq_len, max_images=towers.max_images,
                             sequences_per_batch=towers.sequences_per_batch, open_sequences=towers.open_sequences)
    stats = ReadStats()
    labels: list[int | None] = []
    captions: list[list[str]] = []
    keys: list[str] = []

    def patched():
        for item in dataset.read(stats):
            index = len(keys)
            keys.append(item.key)
            labels.append(item.label)
            captions.append(item.captions)
            yield patch_image(str(index), item.image, policy)

    rows: dict[int, torch.Tensor] = {}
    tokens, seconds = 0, 0.0
    bar = tqdm(total=dataset.size, desc=f"{desc} @{budget} tokens", unit="img", disable=not progress,
               dynamic_ncols=True)
    for batch in packer.pack_stream(patched(), flush=True):
        order = [int(k) for k in batch.flat_keys() if k is not None]
        batch = batch.to(towers.device)
        start = time.perf_counter()
        emb = towers.encode_batch(batch)
        if towers.device.type == "cuda":
            torch.cuda.synchronize(towers.device)
        seconds += time.perf_counter() - start
        tokens += int((batch.segment >= 0).sum())
        for index, row in zip(order, emb.float().cpu()):
            rows[index] = row
        bar.update(len(order))
    bar.close()
    if not rows:
        raise InputError(f"no readable image in {dataset.name} (skipped: {dict(stats.skipped)})")
    emb = torch.stack([rows[i] for i in range(len(keys))])
    return ImageEmbeddings(emb=emb, keys=keys, labels=labels, captions=captions, budget=budget, tokens=tokens,
                           encode_seconds=seconds, padding=packer.padding_fraction, stats=stats)


WHOLE_IMAGE_BATCH = 64


def _embed_whole_images(towers: Towers, dataset: EvalDataset, budget: int, progress: bool, desc: str) -> ImageEmbeddings:
    """Embeddings of a model that takes whole images (no packing, hence no padding)."""
    stats = ReadStats()
    keys, labels, captions, parts = [], [], [], []
    tokens, seconds = 0, 0.0
    bar = tqdm(total=dataset.size, desc=f"{desc} @{budget} tokens", unit="img", disable=not progress,
               dynamic_ncols=True)
    items = iter(dataset.read(stats))
    while chunk := list(itertools.islice(items, WHOLE_IMAGE_BATCH)):
        for item in chunk:
            keys.append(item.key)
            labels.append(item.label)
            captions.append(item.captions)
        start = time.perf_counter()
        emb, used = towers.encode_images([item.image for item in chunk], budget)
        seconds += time.perf_counter() - start
        tokens += used
        parts.append(emb.float().cpu())
        bar.update(len(chunk))
    bar.close()
    if not parts:
        raise InputError(f"no readable image in {dataset.name} (skipped: {dict(stats.skipped)})")
    return ImageEmbeddings(emb=torch.cat(parts), keys=keys, labels=labels, captions=captions, budget=budget,
                           tokens=tokens, encode_seconds=seconds, padding=0.0, stats=stats)
