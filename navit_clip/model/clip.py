"""NaViTCLIP: an image tower and a text tower (each owning its projection into one space), a
learned temperature (and bias)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from navit_clip.batch import PackedBatch
from navit_clip.config import ModelConfig
from navit_clip.model.towers import ImageTower, TextTower


class NaViTCLIP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.image = ImageTower(cfg.vision, cfg.embed_dim)
        self.text = TextTower(cfg.text, cfg.embed_dim)
        # Shape [1], not []: DeepSpeed's initial parameter broadcast cannot view 0-dim tensors as bytes.
        self.logit_scale = nn.Parameter(torch.full((1,), float(cfg.init_logit_scale)))
        self.logit_bias = nn.Parameter(torch.full((1,), float(cfg.init_logit_bias))) if cfg.loss == "sigmoid" else None

    def encode_image_slots(self, batch: PackedBatch) -> torch.Tensor:
        """-> L2-normalized image embeddings [S·E_max, embed_dim]; empty slots are zeros."""
        return F.normalize(self.image(batch), dim=-1).flatten(0, 1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [n, T] -> L2-normalized [n, embed_dim]."""
        return F.normalize(self.text(tokens), dim=-1)

    def scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(max=self.cfg.max_logit_scale).exp().squeeze(0)

    def forward(self, batch: PackedBatch) -> dict[str, torch.Tensor]:
        """-> image [n, D], text [n, D], valid [n] over the n = S·E_max slots, and the loss scalars.
        Text is encoded for valid slots only; empty slots get zero rows."""
        valid = batch.valid.flatten()
        image = self.encode_image_slots(batch)
        text_valid = self.encode_text(batch.text.flatten(0, 1)[valid])
        text = text_valid.new_zeros(len(valid), text_valid.shape[-1]).index_copy(0, valid.nonzero().squeeze(1), text_valid)
        out = {"image": image, "text": text, "valid": valid, "logit_scale": self.scale()}
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias.squeeze(0)
        return out
