"""Export the image tower (NaViT + projection), and optionally the text tower, each as its own
`state_dict()` (model.safetensors, text.safetensors) + config.json, and load them back as the same
tower classes for downstream work: pooled embeddings, per-image patch grids and intermediate
layers, for images of any size or for a PackedBatch; with the text tower, zero-shot evaluation
from the export alone.

config.json carries the whole VisionConfig (config_to_dict; an older export's missing fields get
their defaults), the position embedding, the pixel normalisation, the packing limits and which
file holds which tower. Formats 1 and 2 (one file, the CLIP model's earlier names) are converted.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from navit_clip.batch import PackedBatch
from navit_clip.config import ResolutionConfig, TextConfig, VisionConfig, config_from_dict, config_to_dict
from navit_clip.data.packing import pack
from navit_clip.data.patches import patch_image
from navit_clip.data.resolution import ImageSizing
from navit_clip.data.text import CLIP_BPE, TOKENIZER_FILE, cached_tokenizer
from navit_clip.errors import InputError, MissingInputError
from navit_clip.model.clip import NaViTCLIP
from navit_clip.model.navit import unpack_grids
from navit_clip.model.towers import ImageTower, TextTower
from navit_clip.state_match import config_keys, load_matching

FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
CONFIG_FILE = "config.json"
IMAGE_WEIGHTS_FILE = "model.safetensors"
TEXT_WEIGHTS_FILE = "text.safetensors"
PROGRAM_FILE = "image_encoder.pt2"  # the torch.export program `navit-clip export --torch-export` adds
# Formats 1 (image tower only) and 2 (both towers) kept one file, keyed by the CLIP model's earlier names.
LEGACY_WEIGHTS_FILES = {1: "image_encoder.safetensors", 2: "model.safetensors"}
LEGACY_KEYS = {"image": {"visual.": "navit.", "image_proj.": "proj."},
               "text": {"text.": "transformer.", "text_proj.": "proj.", "logit_scale": "logit_scale"}}
EXPORT_FILES = (CONFIG_FILE, IMAGE_WEIGHTS_FILE, TEXT_WEIGHTS_FILE, TOKENIZER_FILE, PROGRAM_FILE,
                *LEGACY_WEIGHTS_FILES.values())


class ImageEncoder(ImageTower):
    """The image tower with the packing limits it was trained with, so it also takes plain images."""

    def __init__(self, *, vision: VisionConfig, embed_dim: int, max_tokens_per_image: int, seq_len: int,
                 max_images: int, sizing: ImageSizing = ImageSizing()) -> None:
        super().__init__(vision, embed_dim)
        self.max_tokens_per_image, self.seq_len, self.max_images = max_tokens_per_image, seq_len, max_images
        self.sizing = sizing  # how plain images become tokens, as in training

    def pack_images(self, images: Sequence[torch.Tensor | Image.Image], max_tokens: int | None = None) -> PackedBatch:
        """Images ([C, H, W] uint8 or float in [0, 1], or PIL) -> PackedBatch whose slot keys are
        the images' indices, each at its native size up to the token budget (a square model's:
        the square it was trained on, at the budget)."""
        if not images:
            raise ValueError("pack_images needs at least one image")
        budget = max_tokens or self.max_tokens_per_image
        if budget > self.seq_len:
            raise ValueError(f"max_tokens={budget} exceeds the sequence length {self.seq_len}")
        policy = self.sizing.policy(patch_size=self.cfg.patch_size, max_side=self.cfg.max_grid_side, max_tokens=budget)
        examples = [patch_image(str(index), image if isinstance(image, Image.Image) else _to_pil(image, index), policy)
                    for index, image in enumerate(images)]  # patch_image makes any mode RGB
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
        return self._restore(self.encode(batch.to(self.proj.weight.device), normalize), order)

    def forward_features(self, images: Sequence | PackedBatch, max_tokens: int | None = None,
                         layers: tuple[int, ...] = ()) -> dict[str, list]:
        """Per-image patch grids [rows, cols, width] after the final norm (`grids`) and, for each
        block index in `layers`, the grids of that block's output (`layer_<i>`), in input order."""
        batch, order = self._as_batch(images, max_tokens)
        batch = batch.to(self.proj.weight.device)
        tokens, kept = self.navit.forward_tokens(batch.patches, batch.coords, batch.segment, layers=layers,
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
    return Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)


def _prepare_export_dir(out: Path, overwrite: bool) -> None:
    """An export folder holds one export: a non-empty folder is refused, or with `overwrite` the
    files of the earlier export are removed (only those, so a wrong --out loses nothing else)."""
    out.mkdir(parents=True, exist_ok=True)
    present = sorted(p.name for p in out.iterdir())
    if present and not overwrite:
        raise InputError(f"export folder {out} is not empty ({', '.join(present[:4])}"
                         f"{', ...' if len(present) > 4 else ''}): pass --overwrite to replace the export in it")
    foreign = [name for name in present if name not in EXPORT_FILES]
    if foreign:
        raise InputError(f"export folder {out} holds files an export does not write ({', '.join(foreign[:4])}): "
                         "export into an empty folder")
    for name in present:
        (out / name).unlink()


def export_image_encoder(model: NaViTCLIP, out_dir: str | Path, *, max_tokens_per_image: int, seq_len: int,
                         max_images: int, with_text: bool = False, overwrite: bool = False,
                         resolution: ResolutionConfig | None = None) -> Path:
    """Write the image tower of a trained NaViTCLIP (and, with_text, the text tower and the
    learned temperature) to out_dir, which must be empty unless `overwrite` replaces its export.
    `resolution` (the run's data.resolution) says how plain images are sized: square or native."""
    out = Path(out_dir)
    _prepare_export_dir(out, overwrite)
    _save_tower(model.image, out / IMAGE_WEIGHTS_FILE)
    text = _export_tokenizer(model.cfg.text, out) if with_text else None
    if with_text:
        _save_tower(model.text, out / TEXT_WEIGHTS_FILE)
    navit = model.image.navit
    config = {"format_version": FORMAT_VERSION, "architecture": "navit-clip",
              "weights": {"image": IMAGE_WEIGHTS_FILE, "text": TEXT_WEIGHTS_FILE if with_text else None},
              "vision": config_to_dict(model.cfg.vision),
              "position_embedding": type(navit.pos_emb).__name__,
              "normalization": {"scale": 1 / 255, "mean": navit.pixel_mean.tolist(), "std": navit.pixel_std.tolist()},
              "embed_dim": model.cfg.embed_dim, "max_tokens_per_image": max_tokens_per_image,
              "seq_len": seq_len, "max_images": max_images, "resolution": _resolution_entry(resolution),
              "text": text,
              "logit_scale": float(model.logit_scale.detach()) if with_text else None,
              "tokenizer": _tokenizer_note(model.cfg.text.tokenizer) if with_text else None}
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return out


def _export_tokenizer(text: TextConfig, out: Path) -> dict:
    """The text config as exported: a SentencePiece model is copied beside the weights and named
    relative to the export, so the export works wherever it is copied."""
    exported = config_to_dict(text)
    if text.tokenizer == CLIP_BPE:
        return exported
    if Path(text.tokenizer).resolve() != (out / TOKENIZER_FILE).resolve():
        shutil.copyfile(text.tokenizer, out / TOKENIZER_FILE)
    return {**exported, "tokenizer": TOKENIZER_FILE}


def _tokenizer_note(tokenizer: str) -> str:
    return "open_clip SimpleTokenizer (bundled BPE)" if tokenizer == CLIP_BPE else f"SentencePiece ({TOKENIZER_FILE})"


def _save_tower(tower: nn.Module, path: Path) -> None:
    save_file({k: v.detach().float().contiguous().cpu() for k, v in tower.state_dict().items()}, str(path),
              metadata={"format": "navit-clip", "format_version": str(FORMAT_VERSION)})


class TextEncoder(TextTower):
    """The text tower as exported: tokens [n, T] -> L2-normalized [n, embed_dim]. `logit_scale` is
    the trained log temperature, kept for scoring."""

    def __init__(self, *, text: TextConfig, embed_dim: int, logit_scale: float = 0.0) -> None:
        super().__init__(text, embed_dim)
        self.register_buffer("logit_scale", torch.full((1,), float(logit_scale)), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.encode(tokens)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """Captions -> token ids [n, context_length] with the tokenizer the tower was trained with."""
        ids = cached_tokenizer(self.cfg.tokenizer, self.context_length)(texts)
        return torch.from_numpy(ids).to(self.proj.weight.device)


def _read_config(path: Path) -> dict:
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
    return config


def _weights_name(config: dict, tower: str) -> str:
    version = config["format_version"]
    return config["weights"][tower] if version >= 3 else LEGACY_WEIGHTS_FILES[version]


def _read_weights(path: Path, config: dict, tower: str) -> dict[str, torch.Tensor]:
    """The state dict of one tower ("image" or "text"), in the tower's own key names."""
    name = _weights_name(config, tower)
    if not (path / name).exists():
        raise MissingInputError(f"{path} is not an exported encoder: {name} is missing")
    try:
        tensors = load_file(str(path / name))
    except (SafetensorError, OSError) as exc:
        raise InputError(f"{path / name} cannot be read (truncated or not a safetensors file: {exc}); "
                         "export the run again") from exc
    if config["format_version"] >= 3:
        return tensors
    renames = LEGACY_KEYS[tower]
    return {new + key[len(old):]: value for key, value in tensors.items()
            for old, new in renames.items() if key.startswith(old)}


def load_image_encoder(path: str | Path, device: str | torch.device = "cpu") -> ImageEncoder:
    """Load the image encoder export_image_encoder wrote; no training code or DeepSpeed needed."""
    path = Path(path)
    config = _read_config(path)
    encoder = _image_encoder(config)
    keys = [*config_keys("vision", VisionConfig, config["vision"]), ("embed_dim", config["embed_dim"], int)]
    load_matching(encoder, _read_weights(path, config, "image"), build=_image_encoder, config=config, keys=keys,
                  config_file=str(path / CONFIG_FILE), weights_file=_weights_name(config, "image"))
    return encoder.to(device).eval()


def _image_encoder(config: dict) -> ImageEncoder:
    return ImageEncoder(vision=config_from_dict(VisionConfig, config["vision"]), embed_dim=config["embed_dim"],
                        max_tokens_per_image=config["max_tokens_per_image"], seq_len=config["seq_len"],
                        max_images=config["max_images"], sizing=_sizing(config))


def _resolution_entry(resolution: ResolutionConfig | None) -> dict:
    return asdict(ImageSizing.of(resolution or ResolutionConfig()))


def _sizing(config: dict) -> ImageSizing:
    """How the export makes tokens of plain images; an entry of an earlier export lacks the keys
    added since (their defaults: NaViT's native sizing, every patch kept)."""
    return ImageSizing(**(config.get("resolution") or {}))


def _text_encoder(config: dict) -> TextEncoder:
    return TextEncoder(text=config_from_dict(TextConfig, config["text"]), embed_dim=config["embed_dim"])


def load_text_encoder(path: str | Path, device: str | torch.device = "cpu") -> TextEncoder:
    """Load the text encoder of an export written with with_text=True."""
    path = Path(path)
    config = _read_config(path)
    if not config.get("text"):
        raise InputError(f"{path} holds no text encoder: export it with `navit-clip export --with-text` "
                         "to evaluate zero-shot from the export alone")
    state = _read_weights(path, config, "text")
    legacy_scale = state.pop("logit_scale", None)  # formats 1 and 2 kept it among the weights
    text = config_from_dict(TextConfig, config["text"])
    if text.tokenizer != CLIP_BPE:  # the copy in the export, named relative to it
        text.tokenizer = str((path / text.tokenizer).absolute())
    encoder = TextEncoder(text=text, embed_dim=config["embed_dim"],
                          logit_scale=config.get("logit_scale") if legacy_scale is None else float(legacy_scale))
    keys = [*config_keys("text", TextConfig, config["text"]), ("embed_dim", config["embed_dim"], int)]
    load_matching(encoder, state, build=_text_encoder, config=config, keys=keys,
                  config_file=str(path / CONFIG_FILE), weights_file=_weights_name(config, "text"))
    return encoder.to(device).eval()
