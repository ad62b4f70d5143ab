"""Contrastive losses over all ranks, with empty (E_max-padded) slots masked out.

This is the plain form: every rank gathers all embeddings (with autograd) and builds the
[B_valid, B_valid] logits. It is the reference that a chunked implementation must equal, in value
and gradients; it is exact, and fine while B is in the low thousands.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from navit_clip import dist


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


def contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, valid: torch.Tensor,
                     logit_scale: torch.Tensor, logit_bias: torch.Tensor | None = None, *,
                     kind: str = "softmax") -> torch.Tensor:
    """Loss of all ranks' valid pairs. Per-rank inputs: image_emb, text_emb [n, D], valid [n] bool,
    with the same n on every rank. Every rank returns the same value; after data-parallel
    gradient averaging the gradients are those of the single global loss."""
    if kind not in ("softmax", "sigmoid"):
        raise ValueError(f"unknown contrastive loss kind {kind!r} (softmax or sigmoid)")
    if kind == "sigmoid" and logit_bias is None:
        raise ValueError("the sigmoid loss needs a logit_bias")
    image = dist.all_gather_with_grad(image_emb)
    text = dist.all_gather_with_grad(text_emb)
    valid = dist.all_gather_no_grad(valid)
    if not bool(valid.any()):
        raise ValueError("no valid image-text pair in the batch on any rank")
    logits = masked_logits(image, text, valid, logit_scale, logit_bias)
    return softmax_loss(logits) if kind == "softmax" else sigmoid_loss(logits)
