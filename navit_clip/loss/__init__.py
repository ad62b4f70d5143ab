"""Contrastive losses over all data-parallel ranks, with empty (E_max-padded) slots masked out.

`contrastive_loss` is the one used in training. It never builds the global [B, B] logits, nor
even one rank's [b, B] row of them: each rank keeps its own image rows, text embeddings travel
around the ring of ranks one block at a time, and each image x text block is computed once in the
cluster, `chunk_size` columns at a time. What a rank holds is O(b·D + b·chunk_size):

    forward   running log-sum-exp per image row (stays home) and per text column (travels with
              its block, lagging one step behind it, and arrives home complete)
    backward  recomputes every chunk from those statistics; the gradient of a text block travels
              with it and arrives home summed over all ranks

Invalid slots are compacted away before anything is computed, so garbage (even NaN) in an empty
slot can never reach the loss or a gradient, and a rank with no valid slot takes part normally.

Parts: `ring.py` moves the blocks and their travelling statistics between ranks, `terms.py` holds
the math of each kind (softmax, sigmoid), `chunked.py` the autograd function that joins them.

`reference_contrastive_loss` is the plain full-matrix form, kept as the reference the chunked
loss must equal (tests, benchmarks).

Gradient convention (the one DeepSpeed's data-parallel averaging needs): every rank returns the
same global loss L; the gradient it returns for its own embeddings is W · dL/d(embeddings) and for
the temperature and bias it is dL/d(scale), dL/d(bias). After DeepSpeed sums the parameter
gradients over ranks and divides by W, every shared parameter holds exactly dL/dθ. Dividing by W
twice (open_clip issue #616) or not at all are the usual mistakes; tests/test_loss_distributed.py
checks the averaged gradients against a single-process run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from navit_clip import dist
from navit_clip.config import LOSS_KINDS
from navit_clip.loss.chunked import ChunkedContrastive
from navit_clip.loss.terms import TERMS

KINDS = LOSS_KINDS  # the choice list is config's; terms.TERMS has one term per kind (tested)
DEFAULT_CHUNK_SIZE = 1024
DEFAULT_MAX_LOGIT_SCALE = 100.0


def _check_inputs(image_emb: torch.Tensor, text_emb: torch.Tensor, valid: torch.Tensor,
                  logit_bias: torch.Tensor | None, kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown contrastive loss kind {kind!r} (one of {', '.join(KINDS)})")
    if TERMS[kind].uses_bias and logit_bias is None:
        raise ValueError(f"the {kind} loss needs a logit_bias")
    if image_emb.dim() != 2 or image_emb.shape != text_emb.shape:
        raise ValueError(f"image and text embeddings must both be [n, D], got {tuple(image_emb.shape)} "
                         f"and {tuple(text_emb.shape)}")
    if valid.dtype != torch.bool or valid.shape != image_emb.shape[:1]:
        raise ValueError(f"valid must be a bool tensor of shape [{image_emb.shape[0]}], got "
                         f"{valid.dtype} {tuple(valid.shape)}")


def contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, valid: torch.Tensor,
                     logit_scale: torch.Tensor, logit_bias: torch.Tensor | None = None, *,
                     chunk_size: int = DEFAULT_CHUNK_SIZE, kind: str = "softmax",
                     max_logit_scale: float = DEFAULT_MAX_LOGIT_SCALE) -> torch.Tensor:
    """Loss of all ranks' valid pairs, equal in value and (after data-parallel averaging) in
    gradients to `reference_contrastive_loss` on the concatenation of every rank's valid pairs.

    Per-rank inputs: image_emb, text_emb [n, D] (any float dtype; computed in fp32), valid [n]
    bool, the same n on every rank. logit_scale is the multiplier (not its log), clamped at
    max_logit_scale; logit_bias is required by the sigmoid kind and ignored by softmax (a shift of
    all logits cancels there). chunk_size bounds the columns of logits held at once."""
    _check_inputs(image_emb, text_emb, valid, logit_bias, kind)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    scale = logit_scale.clamp(max=max_logit_scale)
    bias = logit_bias if TERMS[kind].uses_bias else None
    return ChunkedContrastive.apply(image_emb, text_emb, valid, scale, bias, chunk_size, kind)


# ---------------------------------------------------------------------------------------------
# The plain full-matrix reference.

def masked_logits(image: torch.Tensor, text: torch.Tensor, valid: torch.Tensor, logit_scale: torch.Tensor,
                  logit_bias: torch.Tensor | None = None) -> torch.Tensor:
    """[B_valid, B_valid] image-to-text logits of the valid pairs (rows: images, columns: texts)."""
    image, text = image[valid], text[valid]
    logits = logit_scale * image @ text.T
    return logits + logit_bias if logit_bias is not None else logits


def softmax_loss(logits: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric cross-entropy: each image picks its caption and each caption its image."""
    labels = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def sigmoid_loss(logits: torch.Tensor) -> torch.Tensor:
    """SigLIP's pairwise loss: every pair is an independent binary decision, normalized by B."""
    signs = 2 * torch.eye(len(logits), device=logits.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(signs * logits).sum() / len(logits)


def reference_contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, valid: torch.Tensor,
                               logit_scale: torch.Tensor, logit_bias: torch.Tensor | None = None, *,
                               kind: str = "softmax") -> torch.Tensor:
    """The same loss computed the plain way: every rank gathers all embeddings (with autograd) and
    builds the [B_valid, B_valid] logits. Exact, simple, O(B²) memory per rank."""
    _check_inputs(image_emb, text_emb, valid, logit_bias, kind)
    image = dist.all_gather_with_grad(image_emb)
    text = dist.all_gather_with_grad(text_emb)
    valid = dist.all_gather_no_grad(valid)
    if not bool(valid.any()):
        raise ValueError("no valid image-text pair in the batch on any rank")
    logits = masked_logits(image, text, valid, logit_scale, logit_bias)
    return softmax_loss(logits) if kind == "softmax" else sigmoid_loss(logits)
