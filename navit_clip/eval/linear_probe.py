"""Linear probe of the frozen image encoder, CLIP_benchmark's `linear_probe` task: embed the
labelled training and evaluation images, fit a multinomial logistic regression on the training
embeddings, report its accuracy on the evaluation images.

Features are what zero-shot classification scores: the pooled image embedding after the
projection, L2-normalised (CLIP_benchmark's Featurizer gives the same). The classifier is fit
full-batch by L-BFGS on the mean cross-entropy plus (weight_decay / 2)·‖W‖² (bias not penalised),
a strictly convex problem with one optimum, on the evaluation device; the weight decay is the one of `WEIGHT_DECAYS` with
the best acc1 on a held-out fifth of the training images, then refit on all of them.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F

from navit_clip.errors import InputError
from navit_clip.eval.datasets import EvalDataset, open_dataset
from navit_clip.eval.embed import ImageEmbeddings, embed_images
from navit_clip.eval.metrics import classification_metrics
from navit_clip.eval.towers import Towers

log = logging.getLogger(__name__)

WEIGHT_DECAYS = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)  # strongest first: a tie keeps the simpler model
HOLDOUT_FRACTION = 0.2


@dataclass
class LogisticRegression:
    weight: torch.Tensor  # [C, D]
    bias: torch.Tensor  # [C]

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return features.to(self.weight.dtype) @ self.weight.T + self.bias


def fit_logistic(features: torch.Tensor, labels: torch.Tensor, num_classes: int, weight_decay: float,
                 max_iter: int = 500) -> LogisticRegression:
    """Minimise mean cross-entropy + weight_decay/2 · ‖W‖² over W [C, D] and b [C], full-batch
    L-BFGS with a strong-Wolfe line search, in float64."""
    x, y = features.double(), labels.long()
    weight = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9,
                                  tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight.T + bias, y) + 0.5 * weight_decay * weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad(), _one_thread_if_small(x):
        optimizer.step(objective)
    return LogisticRegression(weight.detach(), bias.detach())


@contextmanager
def _one_thread_if_small(x: torch.Tensor, small: int = 1 << 20) -> Iterator[None]:
    """Each L-BFGS step is a few tiny ops: on a CPU, threads would cost more in synchronisation
    than they save (20 times the time on a busy 2-core machine), so a small problem runs on one."""
    threads = torch.get_num_threads()
    if x.device.type == "cpu" and x.numel() <= small and threads > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def choose_weight_decay(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                        seed: int = 0) -> tuple[float, dict[str, float]]:
    """The weight decay with the best held-out acc1 (a random fifth of the training images held
    out, at least one), and each candidate's held-out acc1."""
    n = len(labels)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    held = max(1, int(round(n * HOLDOUT_FRACTION))) if n > 1 else 0
    if held == 0:
        return WEIGHT_DECAYS[0], {}
    test, fit = order[:held], order[held:]
    scores = {}
    for decay in WEIGHT_DECAYS:
        model = fit_logistic(features[fit], labels[fit], num_classes, decay)
        scores[f"{decay:g}"] = float((model.logits(features[test]).argmax(-1) == labels[test]).double().mean())
    best = max(WEIGHT_DECAYS, key=lambda decay: scores[f"{decay:g}"])  # first maximum: the strongest
    return best, scores


def labelled(images: ImageEmbeddings, num_classes: int, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The embeddings and labels of the images whose label is a class index; the others are
    counted in the images' skipped samples (`no_label`, `label_out_of_range`)."""
    keep = []
    for index, label in enumerate(images.labels):
        if isinstance(label, int) and 0 <= label < num_classes:
            keep.append(index)
        else:
            images.stats.skipped["no_label" if label is None else "label_out_of_range"] += 1
    if len(keep) < len(images.labels):
        log.warning("linear probe: %d %s images without a class label in [0, %d) skipped",
                    len(images.labels) - len(keep), what, num_classes)
    if not keep:
        raise InputError(f"no labelled image among the {what} images of the linear probe")
    return images.emb[keep], torch.tensor([images.labels[i] for i in keep])


def linear_probe(towers: Towers, train: EvalDataset, test: EvalDataset, budget: int | None = None,
                 progress: bool = True) -> dict:
    """Fit on `train`'s embeddings at `budget` tokens per image, score `test`'s: CLIP_benchmark's
    acc1, acc5 and mean per-class recall, with the chosen weight decay."""
    num_classes = len(test.class_names or train.class_names or [])
    if num_classes < 2:
        raise InputError(f"the linear probe needs class names (two or more) for {test.name}")
    fit_images = embed_images(towers, train, budget, progress=progress, desc="linear probe: train")
    test_images = embed_images(towers, test, budget, progress=progress, desc="linear probe: eval")
    x_fit, y_fit = (t.to(towers.device) for t in labelled(fit_images, num_classes, "training"))
    x_test, y_test = (t.to(towers.device) for t in labelled(test_images, num_classes, "evaluation"))
    decay, holdout = choose_weight_decay(x_fit, y_fit, num_classes)
    model = fit_logistic(x_fit, y_fit, num_classes, decay)
    metrics = classification_metrics(model.logits(x_test), y_test)
    return {
        "acc1": metrics["acc1"], "acc5": metrics["acc5"], "mean_per_class_recall": metrics["mean_per_class_recall"],
        "num_images": len(y_test), "num_train_images": len(y_fit), "num_classes": num_classes,
        "chance_acc1": 1 / num_classes, "weight_decay": decay, "holdout_acc1": holdout,
        "train_acc1": float((model.logits(x_fit).argmax(-1) == y_fit).double().mean()),
        "features": "pooled image embedding after projection, L2-normalised",
        "max_tokens_per_image": test_images.budget, "tokens_per_image": test_images.tokens_per_image,
        "images_per_second": test_images.images_per_second, "padding": test_images.padding,
        "skipped_samples": dict(test_images.stats.skipped + fit_images.stats.skipped),
        "per_class_acc1": dict(zip(test.class_names or [], metrics["per_class_recall"])),
    }


def probe_training_data(towers: Towers, data: str, given: bool, train_data: str | None,
                        class_names_file: str | None = None) -> EvalDataset:
    """The labelled images the probe is fit on: --train-data; else a CLIP_benchmark root's `train`
    split; else, for a run evaluated without --data (on its eval shards), its data.train_shards."""
    if train_data is None and (Path(data) / "train").is_dir():
        train_data = data
    if train_data is None and not given and towers.cfg is not None:
        train_data = towers.cfg.data.train_shards
    if train_data is None:
        raise InputError("the linear probe needs labelled training images: name them with --train-data "
                         "(a dataset in any layout `--data` takes)")
    dataset = open_dataset(str(train_data), split="train", class_names_file=class_names_file)
    if dataset.kind != "classification":
        raise InputError(f"{train_data} has no class labels: the linear probe is fit on labelled images")
    return dataset
