"""The math of each contrastive loss kind, apart from the ring that moves blocks between ranks.

A term turns one [c, cols] chunk of logits (this rank's image rows x a visiting text block's
columns) into the statistics the loss needs, and later into dL/dlogits of that chunk:

    softmax  running log-sum-exp per image row (stays home) and per text column (travels with its
             block); dL/dlogits = (softmax over the row + softmax over the column - 2·I) / 2B
    sigmoid  a running sum of softplus over every pair, nothing per column;
             dL/dlogits = (sigmoid(logits) - I) / B

`sides` is the normaliser: each positive pair is counted once per side (image and text for
softmax, once for sigmoid), so the loss is divided by sides·B. The chunked loss (chunked.py)
handles the positive-pair diagonal, the bias and every gradient product the same way for both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def logsumexp_(logits: torch.Tensor, dim: int) -> torch.Tensor:
    """Log-sum-exp over a non-empty dim, overwriting logits: one [c, cols] buffer, not three."""
    top = logits.amax(dim=dim, keepdim=True)
    top = torch.where(torch.isfinite(top), top, 0.0)
    return logits.sub_(top).exp_().sum(dim=dim, keepdim=True).log_().add_(top).squeeze(dim)


class Term:
    """What the chunked loss asks of a loss kind. One instance per forward, built from this
    rank's valid image rows [c, D], holding their running statistics."""

    sides: int  # times each positive pair is counted: the loss is a sum over sides·B
    uses_bias: bool  # whether a logit bias changes the loss (it needs one), or cancels (it gets none)
    column_start: float | None = None  # a column statistic before any row is folded in; None: none kept

    @staticmethod
    def merge_columns(arrived: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        """A column statistic from the ranks before this one, combined with this rank's part."""
        raise NotImplementedError

    def add_chunk(self, logits: torch.Tensor) -> torch.Tensor | None:
        """Fold a [c, cols] chunk of logits into the row statistics (overwriting logits); the
        chunk's column statistics, if the term keeps any."""
        raise NotImplementedError

    def local_sum(self, positives: torch.Tensor, columns: torch.Tensor | None) -> torch.Tensor:
        """This rank's share (fp64) of sides·B·loss, from its positive logits [c] and the complete
        statistics of its own columns [c]."""
        raise NotImplementedError

    def row_stats(self) -> torch.Tensor | None:
        """What the backward needs of the rows (saved for it)."""
        return None

    @staticmethod
    def logit_grad(logits: torch.Tensor, rows: torch.Tensor | None, columns: torch.Tensor) -> torch.Tensor:
        """sides·B·dL/dlogits of a chunk without the positive-pair diagonal, overwriting logits;
        rows: row_stats() from the forward, columns: the chunk's column statistics."""
        raise NotImplementedError


class SoftmaxTerm(Term):
    """CLIP's symmetric cross-entropy: each image picks its caption and each caption its image."""

    sides = 2
    uses_bias = False  # a shift of all logits cancels in a softmax
    column_start = float("-inf")  # the column log-sum-exp travels around the ring with its block

    def __init__(self, rows: torch.Tensor) -> None:
        self.row_lse = rows.new_full((len(rows),), float("-inf"))

    @staticmethod
    def merge_columns(arrived: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        return torch.logaddexp(arrived, local)

    def add_chunk(self, logits: torch.Tensor) -> torch.Tensor:
        self.row_lse = torch.logaddexp(self.row_lse, logsumexp_(logits.clone(), dim=1))
        return logsumexp_(logits, dim=0)

    def local_sum(self, positives: torch.Tensor, column_lse: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of its image rows plus that of its own text columns."""
        return (self.row_lse - positives).sum(dtype=torch.float64) + (column_lse - positives).sum(dtype=torch.float64)

    def row_stats(self) -> torch.Tensor:
        return self.row_lse

    @staticmethod
    def logit_grad(logits: torch.Tensor, row_lse: torch.Tensor, column_lse: torch.Tensor) -> torch.Tensor:
        """sides·B·dL/dlogits off the diagonal (overwriting logits): row softmax + column softmax."""
        return (logits - row_lse[:, None]).exp_().add_(logits.sub_(column_lse[None, :]).exp_())


class SigmoidTerm(Term):
    """SigLIP's pairwise loss: every pair is an independent binary decision, normalized by B."""

    sides = 1
    uses_bias = True

    def __init__(self, rows: torch.Tensor) -> None:
        self.pair_sum = rows.new_zeros((), dtype=torch.float64)

    def add_chunk(self, logits: torch.Tensor) -> None:
        self.pair_sum += F.softplus(logits).sum(dtype=torch.float64)

    def local_sum(self, positives: torch.Tensor, column_stats: None) -> torch.Tensor:
        """Σ softplus over this rank's pairs, less its positives (softplus(z) - z = softplus(-z))."""
        return self.pair_sum - positives.sum(dtype=torch.float64)

    @staticmethod
    def logit_grad(logits: torch.Tensor, row_stats: None, column_stats: torch.Tensor) -> torch.Tensor:
        """B·dL/dlogits off the diagonal (overwriting logits): sigmoid of every logit."""
        return logits.sigmoid_()


TERMS: dict[str, type[Term]] = {"softmax": SoftmaxTerm, "sigmoid": SigmoidTerm}
