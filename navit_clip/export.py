"""Export the image encoder (NaViT + projection) as safetensors + config.json, and load it back
as a standalone module for downstream work: pooled embeddings, per-image patch grids and
intermediate layers, for images of any size or for a PackedBatch.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from navit_clip.batch import PackedBatch
from navit_clip.config import VisionConfig, config_from_dict
from navit_clip.data.loader import patch_image
from navit_clip.data.packing import pack
from navit_clip.data.resolution import ResolutionPolicy
from navit_clip.model.clip import NaViTCLIP
from navit_clip.model.navit import NaViT, unpack_grids

FORMAT_VERSION = 1
WEIGHTS_FILE = "image_encoder.safetensors"
CONFIG_FILE = "config.json"


class ImageEncoder(nn.Module):
    """NaViT and its projection, with the packing needed to take plain images."""

    def __init__(self, *, vision: VisionConfig, embed_dim: int, max_tokens_per_image: int, seq_len: int,
                 max_images: int) -> None:
        super().__init__()
        self.vision_cfg = vision
        self.max_tokens_per_image = max_tokens_per_image
        self.seq_len = seq_len
        self.max_images = max_images
        self.visual = NaViT(vision)
        self.image_proj = nn.Linear(vision.width, embed_dim, bias=False)

    def pack_images(self, images: Sequence[torch.Tensor | Image.Image], max_tokens: int | None = None) -> PackedBatch:
        """Images ([C, H, W] uint8 or float in [0, 1], or PIL) -> PackedBatch whose slot keys are
        the images' indices, each at its native size up to the token budget."""
        if not images:
            raise ValueError("pack_images needs at least one image")
        budget = max_tokens or self.max_tokens_per_image
        if budget > self.seq_len:
            raise ValueError(f"max_tokens={budget} exceeds the sequence length {self.seq_len}")
        policy = ResolutionPolicy(patch_size=self.vision_cfg.patch_size, max_tokens=budget,
                                  max_side=self.vision_cfg.max_grid_side)
        no_text = np.zeros(1, dtype=np.int64)
        examples = [patch_image(str(index), (image if isinstance(image, Image.Image) else _to_pil(image, index))
                                .convert("RGB"), policy, no_text) for index, image in enumerate(images)]
        return pack(examples, self.seq_len, self.max_images)

    def _as_batch(self, images: Sequence | PackedBatch, max_tokens: int | None) -> tuple[PackedBatch, list[int] | None]:
        if isinstance(images, PackedBatch):
            return images, None
        batch = self.pack_images(images, max_tokens)
        order = [int(k) for k in batch.flat_keys() if k is not None]
        return batch, order

    @staticmethod
    def _restore(items: torch.Tensor | list, order: list[int] | None):
        if order is None:
            return items
        index = torch.tensor(order).argsort().tolist()
        return items[torch.tensor(index)] if isinstance(items, torch.Tensor) else [items[i] for i in index]

    def forward(self, images: Sequence | PackedBatch, max_tokens: int | None = None, normalize: bool = True) -> torch.Tensor:
        """Pooled embeddings [n, embed_dim] of the input images in input order (for a PackedBatch:
        its valid slots in row-major order). Normalized as in training unless normalize=False."""
        batch, order = self._as_batch(images, max_tokens)
        batch = batch.to(self.image_proj.weight.device)
        pooled = self.visual(batch.patches, batch.coords, batch.segment, batch.max_images, grid=batch.grid)
        emb = self.image_proj(pooled).flatten(0, 1)[batch.valid.flatten()]
        return self._restore(F.normalize(emb, dim=-1) if normalize else emb, order)

    def forward_features(self, images: Sequence | PackedBatch, max_tokens: int | None = None,
                         layers: tuple[int, ...] = ()) -> dict[str, list]:
        """Per-image patch grids [rows, cols, width] after the final norm (`grids`) and, for each
        block index in `layers`, the grids of that block's output (`layer_<i>`), in input order."""
        batch, order = self._as_batch(images, max_tokens)
        batch = batch.to(self.image_proj.weight.device)
        tokens, kept = self.visual.forward_tokens(batch.patches, batch.coords, batch.segment, layers=layers,
                                                  grid=batch.grid)
        out = {"grids": self._restore(unpack_grids(tokens, batch.coords, batch.segment, batch.grid, batch.valid), order)}
        for layer, feats in kept.items():
            out[f"layer_{layer}"] = self._restore(unpack_grids(feats, batch.coords, batch.segment, batch.grid,
                                                               batch.valid), order)
        return out


def _to_pil(image: torch.Tensor, index: int) -> Image.Image:
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"image {index} must be [C, H, W] with C in (1, 3), got shape {tuple(image.shape)}")
    if image.is_floating_point():
        if image.min() < 0 or image.max() > 1:
            raise ValueError(f"float image {index} must hold values in [0, 1]")
        image = (image * 255).round()
    array = image.to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).convert("RGB")


def export_image_encoder(model: NaViTCLIP, out_dir: str | Path, *, max_tokens_per_image: int, seq_len: int,
                         max_images: int) -> Path:
    """Write the image tower and projection of a trained NaViTCLIP to out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {f"visual.{k}": v for k, v in model.visual.state_dict().items()}
    tensors["image_proj.weight"] = model.image_proj.weight
    save_file({k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}, str(out / WEIGHTS_FILE),
              metadata={"format": "navit-clip-image-encoder", "format_version": str(FORMAT_VERSION)})
    config = {"format_version": FORMAT_VERSION, "vision": dataclasses.asdict(model.cfg.vision),
              "embed_dim": model.cfg.embed_dim, "max_tokens_per_image": max_tokens_per_image,
              "seq_len": seq_len, "max_images": max_images}
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return out


def load_image_encoder(path: str | Path, device: str | torch.device = "cpu") -> ImageEncoder:
    """Load what export_image_encoder wrote; no training code or DeepSpeed needed."""
    path = Path(path)
    config_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
    for needed in (config_path, weights_path):
        if not needed.exists():
            raise FileNotFoundError(f"{path} is not an exported image encoder: {needed.name} is missing")
    config = json.loads(config_path.read_text())
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{config_path} has format_version {config.get('format_version')}, "
                         f"this navit-clip reads {FORMAT_VERSION}")
    encoder = ImageEncoder(vision=config_from_dict(VisionConfig, config["vision"]), embed_dim=config["embed_dim"],
                           max_tokens_per_image=config["max_tokens_per_image"], seq_len=config["seq_len"],
                           max_images=config["max_images"])
    encoder.load_state_dict(load_file(str(weights_path)), strict=True)
    return encoder.to(device).eval()
