"""What evaluation needs from a model, whichever form it comes in: a training run (its latest or
a tagged checkpoint) or an exported encoder directory (image tower, and the text tower when it
was exported with it). Both give packed-image and text embeddings in one shared space."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from navit_clip.batch import PackedBatch
from navit_clip.data.resolution import ImageSizing
from navit_clip.data.text import CLIP_BPE, cached_tokenizer
from navit_clip.errors import InputError, MissingInputError


@dataclass
class Towers:
    name: str
    encode_batch: Callable[[PackedBatch], torch.Tensor]  # -> normalized [valid slots, D], row-major
    encode_text: Callable[[torch.Tensor], torch.Tensor] | None  # tokens [n, T] -> normalized [n, D]
    context_length: int
    patch_size: int
    max_side: int
    seq_len: int
    max_images: int
    max_tokens_per_image: int  # the training budget
    device: torch.device
    step: int | None = None
    sequences_per_batch: int = 8
    open_sequences: int = 8
    cfg: object | None = None  # the training Config, for a training run
    tokenizer: str = CLIP_BPE  # model.text.tokenizer: clip-bpe or the SentencePiece file kept with the model
    sizing: ImageSizing = ImageSizing()  # how training made tokens of an image: square or native, blank patches
    # A model that takes whole images instead of packed batches (e.g. a fixed-square ViT):
    # (images, token budget) -> (normalized [n, D], image tokens encoded).
    encode_images: Callable[[list[Image.Image], int], tuple[torch.Tensor, int]] | None = None

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """Captions -> token ids [n, context_length] on the towers' device, as in training."""
        return torch.from_numpy(cached_tokenizer(self.tokenizer, self.context_length)(texts)).to(self.device)

    def require_text(self) -> Callable[[torch.Tensor], torch.Tensor]:
        if self.encode_text is None:
            raise InputError(f"{self.name} has no text encoder: zero-shot evaluation needs one; export with "
                             "`navit-clip export --with-text` or evaluate the training run")
        return self.encode_text


def from_training_model(model, cfg, device: torch.device | str = "cpu", name: str = "navit-clip",
                        step: int | None = None) -> Towers:
    """Towers of an in-memory NaViTCLIP with its Config."""
    device = torch.device(device)
    model = model.to(device).eval()
    return Towers(name=name, encode_batch=model.image.encode, encode_text=model.text.encode,
                  context_length=cfg.model.text.context_length, tokenizer=cfg.model.text.tokenizer,
                  patch_size=cfg.model.vision.patch_size, max_side=cfg.model.vision.max_grid_side,
                  seq_len=cfg.data.seq_len, max_images=cfg.data.max_images,
                  max_tokens_per_image=cfg.data.resolution.max_tokens, device=device, step=step, cfg=cfg,
                  sequences_per_batch=cfg.eval.sequences_per_batch, open_sequences=cfg.data.packing.open_sequences,
                  sizing=ImageSizing.of(cfg.data.resolution))


def load_towers(path: str | Path, tag: str | None = None, device: torch.device | str = "cpu",
                overrides: list[str] | None = None) -> Towers:
    """A training run directory (has checkpoints/) or an exported encoder (has config.json)."""
    from navit_clip.export import CONFIG_FILE

    path = Path(path)
    if not path.exists():
        raise MissingInputError(f"model path {path} does not exist")
    if (path / "checkpoints").is_dir():
        from navit_clip.config import apply_overrides
        from navit_clip.train.checkpoint import load_trained_model

        model, cfg, step = load_trained_model(path, tag)
        apply_overrides(cfg, overrides or [])
        return from_training_model(model, cfg, device, name=str(path), step=step)
    if (path / CONFIG_FILE).exists():
        if overrides:
            raise InputError(f"config overrides {overrides} apply to training runs only, not to the export {path}")
        return _from_export(path, torch.device(device))
    raise MissingInputError(f"{path} is neither a training run (no checkpoints/ folder) nor an exported encoder "
                            f"(no {CONFIG_FILE})")


def _from_export(path: Path, device: torch.device) -> Towers:
    import json

    from navit_clip.export import CONFIG_FILE, load_image_encoder, load_text_encoder

    image = load_image_encoder(path, device)
    text = load_text_encoder(path, device) if json.loads((path / CONFIG_FILE).read_text()).get("text") else None
    return Towers(name=str(path), encode_batch=image.encode, encode_text=text.encode if text is not None else None,
                  context_length=text.context_length if text is not None else 0,
                  tokenizer=text.cfg.tokenizer if text is not None else CLIP_BPE,
                  patch_size=image.cfg.patch_size, max_side=image.cfg.max_grid_side,
                  seq_len=image.seq_len, max_images=image.max_images,
                  max_tokens_per_image=image.max_tokens_per_image, device=device,
                  sizing=image.sizing)
