"""The analytic FLOPs count of train/flops.py against torch's FlopCounterMode on real steps.

The model runs per-image attention with SDPA's math kernel, so the counter sees every image's
attention as the matrix products it is (torch counts no CPU flash-attention kernel), at each
image's own length."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from navit_clip.config import load_config
from navit_clip.data.packing import PatchedImage, pack
from navit_clip.model.clip import NaViTCLIP
from navit_clip.train.flops import forward_flops, training_flops

DEFAULT = "configs/default.yaml"


def random_batch(cfg, seed: int, images: int = 20):
    """Images of 1..max_tokens patches in random grids, packed as training packs them."""
    rng = np.random.default_rng(seed)
    patch_dim, T = cfg.model.vision.patch_size ** 2 * 3, cfg.model.text.context_length
    examples = []
    for i in range(images):
        rows = int(rng.integers(1, 9))
        cols = int(rng.integers(1, cfg.data.resolution.max_tokens // rows + 1))
        coords = np.stack(np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij"), -1).reshape(-1, 2)
        text = np.zeros(T, dtype=np.int64)
        text[: int(rng.integers(2, T))] = rng.integers(1, 1000)
        examples.append(PatchedImage(key=str(i), patches=rng.integers(0, 256, (rows * cols, patch_dim), dtype=np.uint8),
                                     coords=coords.astype(np.int64), grid=(rows, cols), text=text))
    return pack(examples, cfg.data.seq_len, cfg.data.max_images)


def counted(model, batch, backward: bool) -> tuple[float, dict]:
    """FLOPs FlopCounterMode sees in a forward (and backward) of the model -> (total, per module)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = model(batch)
        if backward:
            (out["image"].sum() + out["text"].sum()).backward()
    per_module = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    return float(counter.get_total_flops()), per_module


@pytest.mark.parametrize("seed, overrides", [(0, []), (1, ["model.vision.pooling=mean", "model.vision.posemb=fourier",
                                                              "model.vision.width=96", "model.vision.heads=3",
                                                              "data.seq_len=200"])])
def test_forward_flops_of_each_tower_equal_the_counters(seed, overrides):
    cfg = load_config(DEFAULT, ["model.vision.attention=sdpa_per_image", *overrides])
    model = NaViTCLIP(cfg.model)
    batch = random_batch(cfg, seed)
    assert (batch.segment < 0).any(), "the batch should hold padding, which is counted too"
    _, per_module = counted(model, batch, backward=False)
    ours = forward_flops(cfg.model, batch)
    assert ours["vision"] == pytest.approx(per_module["NaViTCLIP.image"], rel=0.01)
    assert ours["text"] == pytest.approx(per_module["NaViTCLIP.text"], rel=0.01)


def test_training_flops_of_a_step_within_five_percent_of_the_counter():
    cfg = load_config(DEFAULT, ["model.vision.attention=sdpa_per_image"])
    model = NaViTCLIP(cfg.model)
    batch = random_batch(cfg, seed=2)
    total, _ = counted(model, batch, backward=True)
    assert training_flops(cfg.model, batch) == pytest.approx(total, rel=0.05)


def test_attention_is_counted_per_image_not_per_sequence():
    """Two layouts with the same tokens: one image filling each sequence costs more attention
    than many small images; the linear layers cost the same."""
    cfg = load_config(DEFAULT, [])
    S, L = 2, cfg.data.seq_len
    one = torch.zeros(S, L, dtype=torch.long)
    many = (torch.arange(L) // 16).expand(S, L).clone()  # 16 images of 16 tokens per sequence
    from navit_clip.train.flops import vision_forward

    v, W = cfg.model.vision, cfg.model.vision.width
    difference = vision_forward(v, 128, one, 16) - vision_forward(v, 128, many, 16)
    assert difference == pytest.approx(v.depth * 4 * W * S * (L ** 2 - 16 * 16 ** 2))
