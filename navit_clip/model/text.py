"""Causal text transformer (CLIP's): the feature at each caption's end token is its embedding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from navit_clip.config import TextConfig
from navit_clip.model.transformer import Block


def causal_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class TextTransformer(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.token_emb = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos_emb = nn.Parameter(torch.randn(cfg.context_length, cfg.width) * 0.01)
        self.blocks = nn.ModuleList(Block(dim=cfg.width, heads=cfg.heads, mlp_ratio=cfg.mlp_ratio,
                                           checkpointing=cfg.grad_checkpointing) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width)
        nn.init.normal_(self.token_emb.weight, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [n, T] int -> [n, width]. The end token has the largest id in the BPE
        vocabulary, so argmax finds it (open_clip's convention)."""
        if tokens.shape[-1] > self.cfg.context_length:
            raise ValueError(f"captions have {tokens.shape[-1]} tokens, more than "
                             f"model.text.context_length={self.cfg.context_length}")
        T = tokens.shape[-1]
        x = self.token_emb(tokens) + self.pos_emb[:T]
        for block in self.blocks:
            x = block(x, causal_attend)
        x = self.norm(x)
        return x[torch.arange(len(tokens), device=tokens.device), tokens.argmax(dim=-1)]
