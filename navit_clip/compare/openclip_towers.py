"""An open_clip checkpoint as evaluation Towers: images are embedded the open_clip way (resize the
short side, centre-crop a square, its normalisation) and captions with its tokenizer, so the
zero-shot code of navit-clip scores it exactly as it scores a navit-clip run.

A token budget B becomes the square of floor(sqrt(B)) patches a side; the model is rebuilt at
that image size with its position table interpolated (open_clip's own `resize_pos_embed`)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from PIL import Image

from navit_clip.data.text import CLIP_BPE
from navit_clip.eval.towers import Towers

MAX_SIDE_PATCHES = 32  # budgets up to 32×32 patches a side


class OpenClipImages:
    """Image encoder of one checkpoint at any square size, built once per size."""

    def __init__(self, model_name: str, checkpoint: str | Path, patch_size: int, device: torch.device) -> None:
        self.model_name, self.checkpoint, self.patch_size, self.device = model_name, str(checkpoint), patch_size, device
        self._built: dict[int, tuple[torch.nn.Module, object]] = {}

    def model(self, side: int):
        """(model, preprocess) with images of `side` pixels a side."""
        if side not in self._built:
            import open_clip

            model, _, preprocess = open_clip.create_model_and_transforms(
                self.model_name, pretrained=self.checkpoint, force_image_size=side, device=self.device)
            self._built[side] = (model.eval(), preprocess)
        return self._built[side]

    def side(self, budget: int) -> int:
        return max(1, math.isqrt(budget)) * self.patch_size

    @torch.no_grad()
    def encode(self, images: list[Image.Image], budget: int) -> tuple[torch.Tensor, int]:
        """-> (normalized embeddings [n, D], image tokens encoded)."""
        side = self.side(budget)
        model, preprocess = self.model(side)
        pixels = torch.stack([preprocess(image) for image in images]).to(self.device)
        emb = model.encode_image(pixels, normalize=True)
        return emb, len(images) * (side // self.patch_size) ** 2


def openclip_towers(model_config: str | Path, checkpoint: str | Path, device: torch.device | str = "cpu",
                    step: int | None = None) -> Towers:
    """Towers of an open_clip_train checkpoint whose model config JSON is `model_config`."""
    import open_clip

    model_config, device = Path(model_config), torch.device(device)
    open_clip.add_model_config(model_config)
    name = model_config.stem
    sizes = json.loads(model_config.read_text())
    patch, context = sizes["vision_cfg"]["patch_size"], sizes["text_cfg"]["context_length"]
    images = OpenClipImages(name, checkpoint, patch, device)
    text_model = images.model(sizes["vision_cfg"]["image_size"])[0]
    max_tokens = (sizes["vision_cfg"]["image_size"] // patch) ** 2

    @torch.no_grad()
    def encode_text(tokens: torch.Tensor) -> torch.Tensor:
        return text_model.encode_text(tokens.to(device), normalize=True)

    # The CLIP BPE ids of navit-clip's tokenizer are open_clip's own (start, BPE ids, end, zero padding).
    return Towers(name=f"open_clip_train:{checkpoint}", encode_batch=_no_packed_input, encode_text=encode_text,
                  context_length=context, tokenizer=CLIP_BPE, patch_size=patch, max_side=MAX_SIDE_PATCHES,
                  seq_len=MAX_SIDE_PATCHES ** 2, max_images=1, max_tokens_per_image=max_tokens, device=device,
                  step=step, encode_images=images.encode)


def _no_packed_input(batch) -> torch.Tensor:
    raise TypeError("an open_clip model takes whole square images, not packed batches")
