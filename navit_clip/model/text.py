"""Text transformer: CLIP's causal tower pooled at each caption's end token, or a SigLIP-style
non-causal tower pooled at the last token or by the mean over the caption.

A caption's end is the first position holding the tokenizer's end token
(`model.text.end_token_id`, set from the tokenizer), or its last non-padding token if it has none.
open_clip's `tokens.argmax()` finds the end only where the end token has the largest id (CLIP's
BPE); for CLIP's BPE both give the same position.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from navit_clip.config import TextConfig
from navit_clip.model.transformer import Block

PAD_ID = 0  # the id captions are padded with (data/text.py)


def causal_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def end_positions(tokens: torch.Tensor, end_token_id: int) -> torch.Tensor:
    """tokens [n, T] -> [n] index of each caption's first end token, or of its last non-padding
    token when it holds none."""
    is_end = tokens == end_token_id
    positions = torch.arange(tokens.shape[-1], device=tokens.device)
    last_token = (positions * (tokens != PAD_ID)).argmax(dim=-1)
    return torch.where(is_end.any(dim=-1), is_end.int().argmax(dim=-1), last_token)


def end_token(cfg: TextConfig) -> int:
    """model.text.end_token_id, or the last id (CLIP's BPE) when it is -1."""
    return cfg.end_token_id if cfg.end_token_id >= 0 else cfg.vocab_size - 1


def text_width(end: torch.Tensor, padded_width: int) -> int:
    """The columns the tower runs on, from each caption's end position (`end_positions`): up to the
    batch's longest caption, its end token included. Nothing after it is ever read (causal, or
    masked and unpooled), so short captions cost their length, not the context's."""
    return int(end.max()) + 1 if len(end) else padded_width


class TextTransformer(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.end_token_id = end_token(cfg)
        self.token_emb = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos_emb = nn.Parameter(torch.randn(cfg.context_length, cfg.width) * 0.01)
        self.blocks = nn.ModuleList(Block(dim=cfg.width, heads=cfg.heads, mlp_ratio=cfg.mlp_ratio,
                                           checkpointing=cfg.grad_checkpointing) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width)
        nn.init.normal_(self.token_emb.weight, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [n, T] int, zero-padded after each caption's end -> [n, width]."""
        if tokens.shape[-1] > self.cfg.context_length:
            raise ValueError(f"captions have {tokens.shape[-1]} tokens, more than "
                             f"model.text.context_length={self.cfg.context_length}")
        end = end_positions(tokens, self.end_token_id)  # the same positions once the columns after them go
        T = text_width(end, tokens.shape[-1])
        tokens = tokens[:, :T]
        inside = torch.arange(T, device=tokens.device) <= end[:, None]  # [n, T]: the caption, end included
        attend = causal_attend if self.cfg.causal else _masked_attend(inside)
        x = self.token_emb(tokens) + self.pos_emb[:T]
        for block in self.blocks:
            x = block(x, attend)
        x = self.norm(x)
        if self.cfg.pooling == "mean":
            weights = inside.to(x.dtype)
            return (x * weights[..., None]).sum(dim=1) / weights.sum(dim=1, keepdim=True)
        return x[torch.arange(len(tokens), device=tokens.device), end]


def _masked_attend(inside: torch.Tensor):
    """Non-causal attention in which every token sees its caption's tokens and none of the padding."""
    mask = inside[:, None, None, :]  # [n, 1 (heads), 1 (queries), T (keys)]

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    return attend
