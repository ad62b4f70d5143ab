"""The two towers of the CLIP model, each with its own projection into the shared embedding space
(as open_clip's `visual.proj`): the training model holds them, and the exported encoders are these
same classes, so an export is a tower's own `state_dict()`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from navit_clip.batch import PackedBatch
from navit_clip.config import TextConfig, VisionConfig
from navit_clip.model.navit import NaViT
from navit_clip.model.text import TextTransformer


class ImageTower(nn.Module):
    """NaViT and the projection of its pooled features: packed images -> one embedding per slot."""

    def __init__(self, cfg: VisionConfig, embed_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.navit = NaViT(cfg)
        self.proj = nn.Linear(cfg.width, embed_dim, bias=False)

    def embed(self, patches: torch.Tensor, coords: torch.Tensor, segment: torch.Tensor, max_images: int,
              grid: torch.Tensor | None = None) -> torch.Tensor:
        """The packed tensors one by one (what torch.export traces) -> unnormalized
        [S, max_images, embed_dim]; empty slots are zeros."""
        return self.proj(self.navit(patches, coords, segment, max_images, grid=grid))

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        """-> unnormalized [S, E_max, embed_dim]; empty slots are zeros."""
        return self.embed(batch.patches, batch.coords, batch.segment, batch.max_images, grid=batch.grid)

    def encode(self, batch: PackedBatch, normalize: bool = True) -> torch.Tensor:
        """-> [valid slots, embed_dim] in row-major slot order, L2-normalized as in training unless
        normalize=False: what evaluation and the exported encoder hand out."""
        emb = self.embed(batch.patches, batch.coords, batch.segment, batch.max_images, grid=batch.grid)
        emb = emb.flatten(0, 1)[batch.valid.flatten()]
        return F.normalize(emb, dim=-1) if normalize else emb


class TextTower(nn.Module):
    """The text transformer and the projection of its end-token feature."""

    def __init__(self, cfg: TextConfig, embed_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.transformer = TextTransformer(cfg)
        self.proj = nn.Linear(cfg.width, embed_dim, bias=False)

    @property
    def context_length(self) -> int:
        return self.cfg.context_length

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [n, T] -> unnormalized [n, embed_dim]."""
        return self.proj(self.transformer(tokens))

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [n, T] -> L2-normalized [n, embed_dim]."""
        return F.normalize(self.proj(self.transformer(tokens)), dim=-1)
