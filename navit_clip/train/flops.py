"""Training FLOPs of a packed batch, counted from the model config and the batch's layout: what
the `flops` field of the metrics rows and the summary adds up.

Counted: every matrix product of both towers (2 FLOPs per multiply-add), padding tokens
included wherever the layer runs on them (the linear layers of the image tower see all S·L token
slots, its projection all S·E_max slots), and attention at each image's real length: packed
attention is per image, so a block costs 4·n²·width for an image of n tokens (QKᵀ and AV), and
the same for each run of padding tokens (they attend to each other). The text tower runs on
the valid slots' captions at the length of the batch's longest one; its causal attention is counted as the
full T² square the kernel computes. Not counted: norms, activations, softmax, embedding
lookups, the pooling's scatter sums and the loss. Backward is counted as 2× forward, so a
micro-batch trained costs 3× its forward.

tests/test_flops.py checks the count against torch.utils.flop_counter.FlopCounterMode.
"""

from __future__ import annotations

import torch

from navit_clip.batch import PackedBatch
from navit_clip.config import ModelConfig, TextConfig, VisionConfig
from navit_clip.model.packed_sdpa import token_groups
from navit_clip.model.text import end_positions, end_token, text_width

BACKWARD_PER_FORWARD = 2.0


def linear(rows: float, fan_in: int, fan_out: int) -> float:
    """Forward FLOPs of a linear layer applied to `rows` vectors."""
    return 2.0 * rows * fan_in * fan_out


def attention(squared_lengths: float, width: int, depth: int) -> float:
    """Forward FLOPs of `depth` layers of attention (QKᵀ and AV) over sequences whose lengths'
    squares sum to `squared_lengths`."""
    return depth * 4.0 * width * squared_lengths


def blocks(tokens: float, width: int, mlp_ratio: float, depth: int) -> float:
    """Forward FLOPs of the linear layers of `depth` transformer blocks over `tokens` tokens."""
    hidden = round(width * mlp_ratio)
    per_block = linear(tokens, width, 3 * width) + linear(tokens, width, width) + 2 * linear(tokens, width, hidden)
    return depth * per_block


def vision_forward(cfg: VisionConfig, embed_dim: int, segment: torch.Tensor, max_images: int) -> float:
    """Forward FLOPs of the image tower on a packed batch with this `segment` [S, L]."""
    S, L = segment.shape
    tokens, width = S * L, cfg.width
    _, runs = token_groups(segment)  # token count of each image and each padding run
    total = (linear(tokens, cfg.patch_size ** 2 * cfg.channels, width) + blocks(tokens, width, cfg.mlp_ratio, cfg.depth)
             + attention(float((runs.double() ** 2).sum()), width, cfg.depth))
    if cfg.posemb == "fourier":  # two axes, each a linear map of 2·64 Fourier features
        axis = width // 2 if cfg.posemb_combine == "stack" else width
        total += 2 * linear(tokens, 128, axis)
    if cfg.pooling == "map":  # keys and values of every token, one query score per head, output per slot
        total += linear(tokens, width, 2 * width) + 2.0 * tokens * width + linear(S * max_images, width, width)
    return total + linear(S * max_images, width, embed_dim)


def text_forward(cfg: TextConfig, embed_dim: int, captions: int, length: int) -> float:
    """Forward FLOPs of the text tower on `captions` captions of `length` tokens."""
    tokens = captions * length
    return (blocks(tokens, cfg.width, cfg.mlp_ratio, cfg.depth) + attention(captions * length ** 2, cfg.width, cfg.depth)
            + linear(captions, cfg.width, embed_dim))


def forward_flops(cfg: ModelConfig, batch: PackedBatch) -> dict[str, float]:
    """-> {"vision": ..., "text": ...}: forward FLOPs of each tower on this batch."""
    return {"vision": vision_forward(cfg.vision, cfg.embed_dim, batch.segment, batch.max_images),
            "text": text_forward(cfg.text, cfg.embed_dim, int(batch.valid.sum()), trained_text_width(cfg.text, batch))}


def trained_text_width(cfg: TextConfig, batch: PackedBatch) -> int:
    """The caption length the text tower runs at on this batch's valid slots (model/text.py)."""
    captions = batch.text.flatten(0, 1)[batch.valid.flatten()]
    return text_width(end_positions(captions, end_token(cfg)), captions.shape[-1])


def training_flops(cfg: ModelConfig, batch: PackedBatch) -> float:
    """Forward and backward FLOPs of both towers on this batch."""
    return (1.0 + BACKWARD_PER_FORWARD) * sum(forward_flops(cfg, batch).values())
