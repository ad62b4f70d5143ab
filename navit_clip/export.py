"""Export the image encoder (NaViT + projection), and optionally the text encoder, as
model.safetensors + config.json, and load them back as standalone modules for downstream work:
pooled embeddings, per-image patch grids and intermediate layers, for images of any size or for
a PackedBatch; with the text encoder, zero-shot evaluation from the export alone.

config.json carries the whole VisionConfig (written by config_to_dict, so fields added later
travel without changes here; loading fills fields an older export lacks with their defaults),
the position-embedding module, the pixel normalisation and the packing limits.
"""

from __future__ import annotations

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
from navit_clip.config import TextConfig, VisionConfig, config_from_dict, config_to_dict
from navit_clip.data.loader import patch_image
from navit_clip.data.packing import pack
from navit_clip.data.resolution import ResolutionPolicy
from navit_clip.errors import InputError, MissingInputError
from navit_clip.model.clip import NaViTCLIP
from navit_clip.model.navit import NaViT, unpack_grids
from navit_clip.model.text import TextTransformer

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1: image tower only, in image_encoder.safetensors
WEIGHTS_FILE = "model.safetensors"
V1_WEIGHTS_FILE = "image_encoder.safetensors"
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


class PackedImageEncoder(nn.Module):
    """The image encoder on packed tensors only, every shape fixed: what torch.export traces."""

    def __init__(self, encoder: ImageEncoder) -> None:
        super().__init__()
        self.visual, self.image_proj, self.max_images = encoder.visual, encoder.image_proj, encoder.max_images

    def forward(self, patches: torch.Tensor, coords: torch.Tensor, segment: torch.Tensor) -> torch.Tensor:
        """patches [S, L, P·P·C] uint8, coords [S, L, 2], segment [S, L] -> normalized [S, E_max, D]
        (empty slots are zeros)."""
        return F.normalize(self.image_proj(self.visual(patches, coords, segment, self.max_images)), dim=-1)


def export_program(encoder: ImageEncoder, num_sequences: int = 1) -> torch.export.ExportedProgram:
    """torch.export of the packed forward at S=num_sequences, L=seq_len, E_max=max_images. The
    program skips the eager check that patch coordinates fit the position table: pack with
    `encoder.pack_images` (or the data pipeline), which never produces larger ones."""
    cfg = encoder.vision_cfg
    S, L = num_sequences, encoder.seq_len
    example = (torch.zeros(S, L, cfg.patch_size * cfg.patch_size * cfg.channels, dtype=torch.uint8),
               torch.zeros(S, L, 2, dtype=torch.int64), torch.full((S, L), -1, dtype=torch.int64))
    device = encoder.image_proj.weight.device
    with torch.no_grad():
        return torch.export.export(PackedImageEncoder(encoder).eval(), tuple(t.to(device) for t in example))


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
                         max_images: int, with_text: bool = False) -> Path:
    """Write the image tower and projection of a trained NaViTCLIP (and, with_text, the text
    tower, its projection and the logit scale) to out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {f"visual.{k}": v for k, v in model.visual.state_dict().items()}
    tensors["image_proj.weight"] = model.image_proj.weight
    if with_text:
        tensors.update({f"text.{k}": v for k, v in model.text.state_dict().items()})
        tensors["text_proj.weight"] = model.text_proj.weight
        tensors["logit_scale"] = model.logit_scale
    save_file({k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}, str(out / WEIGHTS_FILE),
              metadata={"format": "navit-clip", "format_version": str(FORMAT_VERSION)})
    config = {"format_version": FORMAT_VERSION, "architecture": "navit-clip",
              "vision": config_to_dict(model.cfg.vision),
              "position_embedding": type(model.visual.pos_emb).__name__,
              "normalization": {"scale": 1 / 255, "mean": model.visual.pixel_mean.tolist(),
                                "std": model.visual.pixel_std.tolist()},
              "embed_dim": model.cfg.embed_dim, "max_tokens_per_image": max_tokens_per_image,
              "seq_len": seq_len, "max_images": max_images,
              "text": config_to_dict(model.cfg.text) if with_text else None,
              "tokenizer": "open_clip SimpleTokenizer (bundled BPE)" if with_text else None}
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return out


class TextEncoder(nn.Module):
    """The text tower and its projection: tokens [n, T] -> L2-normalized [n, embed_dim]."""

    def __init__(self, *, text: TextConfig, embed_dim: int) -> None:
        super().__init__()
        self.text_cfg = text
        self.text = TextTransformer(text)
        self.text_proj = nn.Linear(text.width, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.zeros(1))

    @property
    def context_length(self) -> int:
        return self.text_cfg.context_length

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(self.text(tokens)), dim=-1)


def _read_export(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    path = Path(path)
    config_path = path / CONFIG_FILE
    if not config_path.exists():
        raise MissingInputError(f"{path} is not an exported encoder: {CONFIG_FILE} is missing")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{config_path} is not valid JSON: {exc}") from exc
    version = config.get("format_version")
    if version not in READABLE_VERSIONS:
        raise InputError(f"{config_path} has format_version {version}, "
                         f"this navit-clip reads {', '.join(map(str, READABLE_VERSIONS))}")
    weights_path = path / (WEIGHTS_FILE if version >= 2 else V1_WEIGHTS_FILE)
    if not weights_path.exists():
        raise MissingInputError(f"{path} is not an exported encoder: {weights_path.name} is missing")
    return config, load_file(str(weights_path))


def _part(tensors: dict[str, torch.Tensor], prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in tensors.items() if k.startswith(prefixes)}


def load_image_encoder(path: str | Path, device: str | torch.device = "cpu") -> ImageEncoder:
    """Load the image encoder export_image_encoder wrote; no training code or DeepSpeed needed."""
    config, tensors = _read_export(path)
    encoder = ImageEncoder(vision=config_from_dict(VisionConfig, config["vision"]), embed_dim=config["embed_dim"],
                           max_tokens_per_image=config["max_tokens_per_image"], seq_len=config["seq_len"],
                           max_images=config["max_images"])
    encoder.load_state_dict(_part(tensors, ("visual.", "image_proj.")), strict=True)
    return encoder.to(device).eval()


def load_text_encoder(path: str | Path, device: str | torch.device = "cpu") -> TextEncoder:
    """Load the text encoder of an export written with with_text=True."""
    config, tensors = _read_export(path)
    if not config.get("text"):
        raise InputError(f"{path} holds no text encoder: export it with `navit-clip export --with-text` "
                         "to evaluate zero-shot from the export alone")
    encoder = TextEncoder(text=config_from_dict(TextConfig, config["text"]), embed_dim=config["embed_dim"])
    encoder.load_state_dict(_part(tensors, ("text.", "text_proj.", "logit_scale")), strict=True)
    return encoder.to(device).eval()
