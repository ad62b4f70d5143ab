"""Zero-shot metrics against hand-computed values and an independent implementation."""

from __future__ import annotations

import pytest
import torch

from navit_clip.eval.metrics import classification_metrics, retrieval_metrics


def scores_from_rankings(rankings: list[list[int]], num_classes: int) -> torch.Tensor:
    """Each row's classes in decreasing score order -> a score matrix with that order."""
    scores = torch.zeros(len(rankings), num_classes)
    for i, ranking in enumerate(rankings):
        for position, c in enumerate(ranking):
            scores[i, c] = num_classes - position
    return scores


def test_classification_by_hand():
    rankings = [[0, 1, 2, 3, 4, 5],  # target 0: top-1 hit
                [2, 1, 0, 3, 4, 5],  # target 1: top-5 only
                [1, 0, 2, 3, 4, 5],  # target 1: top-1 hit
                [0, 1, 3, 4, 5, 2],  # target 2: ranked last, miss
                [3, 4, 5, 1, 2, 0]]  # target 0: ranked last, miss
    target = torch.tensor([0, 1, 1, 2, 0])
    got = classification_metrics(scores_from_rankings(rankings, 6), target)
    assert got["acc1"] == pytest.approx(2 / 5)
    assert got["acc5"] == pytest.approx(3 / 5)
    # recall per class present: class 0 1/2, class 1 1/2, class 2 0/1 -> mean 1/3 (absent classes left out)
    assert got["mean_per_class_recall"] == pytest.approx(1 / 3)
    assert got["per_class_recall"] == [0.5, 0.5, 0.0, None, None, None]


def test_classification_matches_sklearn_balanced_accuracy():
    sklearn = pytest.importorskip("sklearn.metrics")
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(300, 9, generator=gen)
    target = torch.randint(0, 9, (300,), generator=gen)
    got = classification_metrics(scores, target)
    pred = scores.argmax(dim=1)
    assert got["mean_per_class_recall"] == pytest.approx(sklearn.balanced_accuracy_score(target, pred))
    assert got["acc1"] == pytest.approx(sklearn.accuracy_score(target, pred))
    assert got["acc5"] == pytest.approx(sklearn.top_k_accuracy_score(target, scores, k=5, labels=list(range(9))))


def test_acc5_undefined_below_five_classes():
    got = classification_metrics(torch.tensor([[0.1, 0.9, 0.0]]), torch.tensor([0]))
    assert got["acc1"] == 0.0 and got["acc5"] is None


def test_retrieval_by_hand():
    # captions 0 and 1 describe image 0, caption 2 image 1, caption 3 image 2
    scores = torch.tensor([[0.9, 0.1, 0.0],
                           [0.2, 0.8, 0.1],
                           [0.1, 0.3, 0.5],
                           [0.0, 0.4, 0.6]])
    got = retrieval_metrics(scores, torch.tensor([0, 0, 1, 2]), ks=(1, 2, 3))
    # text -> image: best image right for captions 0 and 3; within 2 for all four
    assert got["image_retrieval_recall@1"] == pytest.approx(2 / 4)
    assert got["image_retrieval_recall@2"] == pytest.approx(1.0)
    # image -> text: image 0 ranks caption 0 first, image 2 caption 3; image 1 ranks captions 1, 3, 2
    assert got["text_retrieval_recall@1"] == pytest.approx(2 / 3)
    assert got["text_retrieval_recall@2"] == pytest.approx(2 / 3)
    assert got["text_retrieval_recall@3"] == pytest.approx(1.0)


def test_retrieval_k_larger_than_the_set_and_bad_shapes():
    got = retrieval_metrics(torch.eye(2), torch.tensor([1, 0]), ks=(1, 10))
    assert got["image_retrieval_recall@1"] == 0.0 and got["image_retrieval_recall@10"] == 1.0
    with pytest.raises(ValueError, match="text_image"):
        retrieval_metrics(torch.eye(2), torch.tensor([0, 1, 1]))
