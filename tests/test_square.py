"""The fixed-resolution ViT recipe from the same modules (data.resolution.mode=square): every
image is one R×R square per sequence, made as torchvision's Resize + CenterCrop (or a squash to
R×R) makes it; evaluation and exports of a square model size images the same way; the
comparison configs differ from each other only in data, packing and the position table."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from conftest import make_tiny_image
from navit_clip.compare.recipes import recipe_config, tokens_per_step
from navit_clip.config import ConfigError, config_to_dict, load_config
from navit_clip.data.loader import PackedStream
from navit_clip.data.patches import patch_image, patchify
from navit_clip.data.resolution import ResolutionPolicy
from navit_clip.data.shards import ReadStats
from navit_clip.data.spec import evaluation_spec, stream_spec
from navit_clip.eval.datasets import image_folder
from navit_clip.eval.embed import embed_images
from navit_clip.eval.towers import from_training_model
from navit_clip.export import export_image_encoder, load_image_encoder
from navit_clip.model.clip import NaViTCLIP
from navit_clip.model.posemb import build_posemb

REPO = Path(__file__).resolve().parents[1]
SQUARE = REPO / "configs" / "compare" / "square.yaml"
SMALL = ["model.vision.width=32", "model.vision.heads=2", "model.vision.depth=1", "model.text.width=32",
         "model.text.heads=2", "model.text.depth=1", "model.embed_dim=16"]
SIZES = [(200, 50), (50, 200), (64, 64), (16, 16), (17, 33), (120, 90), (199, 101), (24, 160)]


def reference_square(image: Image.Image, side: int, fit: str) -> np.ndarray:
    """open_clip's preprocessing: torchvision Resize(side) + CenterCrop(side), or Resize((side, side))."""
    bicubic = transforms.InterpolationMode.BICUBIC
    steps = ([transforms.Resize(side, interpolation=bicubic), transforms.CenterCrop(side)] if fit == "crop"
             else [transforms.Resize((side, side), interpolation=bicubic)])
    return np.asarray(transforms.Compose(steps)(image), dtype=np.uint8)


def square_config(*overrides: str):
    return load_config(SQUARE, [*SMALL, *overrides])


@pytest.mark.parametrize("fit", ["crop", "squash"])
def test_square_patches_equal_torchvision_resize_and_centre_crop(fit):
    policy = ResolutionPolicy(patch_size=8, max_tokens=64, max_side=8, mode="square", square_fit=fit)
    for i, (w, h) in enumerate(SIZES):
        image = make_tiny_image(w, h, "RGB", i)
        example = patch_image("x", image, policy)
        assert example.grid == (8, 8) and example.patches.shape == (64, 8 * 8 * 3)
        expected, coords = patchify(Image.fromarray(reference_square(image, 64, fit)), 8, 8, 8)
        np.testing.assert_array_equal(example.patches, expected)
        np.testing.assert_array_equal(example.coords, coords)


def test_crop_keeps_the_centre_and_squash_keeps_everything():
    """A wide image with a red left third, green centre and blue right third: the crop sees only
    green, the squash sees all three colours side by side."""
    stripes = np.zeros((40, 120, 3), np.uint8)
    stripes[:, :40, 0] = stripes[:, 40:80, 1] = stripes[:, 80:, 2] = 255
    image = Image.fromarray(stripes)
    crop = ResolutionPolicy(patch_size=4, max_tokens=16, max_side=4, mode="square", square_fit="crop")
    squash = ResolutionPolicy(patch_size=4, max_tokens=16, max_side=4, mode="square", square_fit="squash")
    cropped = patch_image("c", image, crop).patches.reshape(16, 16, 3).mean(axis=(0, 1))
    assert cropped[1] > 250 and cropped[0] < 5 and cropped[2] < 5
    squashed = patch_image("s", image, squash).patches.reshape(4, 4, 16, 3)  # [rows, cols, pixels, c]
    assert squashed[:, 0, :, 0].mean() > 200 and squashed[:, 3, :, 2].mean() > 200


def test_square_side_follows_the_budget_and_draft_keeps_the_shorter_side():
    policy = ResolutionPolicy(patch_size=8, max_tokens=64, max_side=8, mode="square")
    assert policy.grid_for(1000, 30) == (8, 8) and policy.grid_for(3, 3) == (8, 8)  # upscaled as open_clip does
    # beyond the table side: the table is interpolated, not the image capped
    assert ResolutionPolicy(patch_size=8, max_tokens=144, max_side=8, mode="square").grid_for(50, 50) == (12, 12)
    assert ResolutionPolicy(patch_size=8, max_tokens=40, max_side=8, mode="square").grid_for(50, 50) == (6, 6)
    assert policy.draft_size(640, 320) == (128, 64) and policy.draft_size(40, 80) == (40, 80)


def test_square_config_checks_and_the_comparison_configs():
    for bad, key in (("data.resolution.max_tokens=48", "max_tokens must be a square"),
                     ("data.max_images=2", "max_images must be 1")):
        with pytest.raises(ConfigError, match=key):
            square_config(bad)
    with pytest.raises(ConfigError, match="square_fit must be one of crop, squash"):
        square_config("data.resolution.square_fit=pad")

    def flat(cfg, prefix=""):
        out = {}
        for key, value in cfg.items():
            out.update(flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
        return out

    navit, square = (flat(config_to_dict(load_config(REPO / "configs" / "compare" / f"{n}.yaml")))
                     for n in ("navit", "square"))
    default = flat(config_to_dict(load_config(REPO / "configs" / "default.yaml")))
    # the demo packs 4 sequences (~130 digits); the comparison packs 8, the square recipe's 2,048 slots
    assert {k for k in navit if navit[k] != default[k]} == {"train.out_dir", "data.sequences_per_batch"}
    differ = {k for k in navit if navit[k] != square[k]}
    assert all(k.startswith(("data.", "model.vision.posemb", "model.vision.max_grid_side", "train.out_dir",
                             "eval.sequences_per_batch")) for k in differ), differ
    slots = {recipe: tokens_per_step(recipe, recipe_config(recipe)) for recipe in ("navit", "square", "open_clip")}
    assert slots == {"navit": 2048, "square": 2048, "open_clip": 2048}  # the same image-token slots a step


def test_square_stream_is_one_square_image_per_sequence(tiny_shards):
    from conftest import TINY_SHARD_SIZES

    cfg = square_config(f"data.train_shards={tiny_shards.spec}", "data.sequences_per_batch=4",
                        "data.shuffle_buffer=0", "data.num_workers=0")
    spec = evaluation_spec(cfg, tiny_shards.spec)  # one pass in shard order, the training policy
    assert spec.resolution == stream_spec(cfg).resolution
    seen = 0
    for batch in PackedStream(spec):
        valid = batch.valid.numpy()
        assert batch.patches.shape[1:] == (64, 8 * 8 * 3) and valid.shape[1] == 1
        for s in np.flatnonzero(valid[:, 0]):
            assert (batch.segment[s] == 0).all() and batch.grid[s, 0].tolist() == [8, 8]
            width, height, mode = TINY_SHARD_SIZES[seen]
            image = make_tiny_image(width, height, mode, seen).convert("RGB")
            expected, _ = patchify(Image.fromarray(reference_square(image, 64, "crop")), 8, 8, 8)
            np.testing.assert_array_equal(batch.patches[s].numpy(), expected)
            seen += 1
    assert seen == tiny_shards.count


def test_learned_table_is_interpolated_at_other_square_sides():
    """The square recipe's 8×8 table at fractional coordinates: side 8 reads the table itself,
    side 4 every other entry, side 16 points between entries."""
    torch.manual_seed(0)
    emb = build_posemb(dim=6, max_side=8, kind="learned_2d", coords="fractional")
    table = emb.table.detach()

    def at(side: int) -> torch.Tensor:
        rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        coords = torch.stack([rows, cols], -1).reshape(-1, 2)
        return emb(coords, torch.full_like(coords, side)).detach().reshape(side, side, -1)

    torch.testing.assert_close(at(8), table)
    torch.testing.assert_close(at(4), table[::2, ::2])
    torch.testing.assert_close(at(16)[1, 0], (table[0, 0] + table[1, 0]) / 2)


def image_folder_dataset(root: Path) -> None:
    for c in range(2):
        (root / f"class{c}").mkdir(parents=True)
        for i, (w, h) in enumerate(SIZES[:4]):
            make_tiny_image(w, h, "RGB", 10 * c + i).save(root / f"class{c}" / f"{i}.png")


def captured_eval(towers, dataset, budget=None):
    """The packed batches evaluation feeds the image tower."""
    seen, encode = [], towers.encode_batch
    towers.encode_batch = lambda batch: seen.append(batch) or encode(batch)
    embed_images(towers, dataset, budget, progress=False)
    return seen


def test_eval_and_export_of_a_square_model_embed_squares(tmp_path):
    image_folder_dataset(tmp_path / "data")
    dataset = image_folder(tmp_path / "data")
    cfg = square_config()
    torch.manual_seed(0)
    model = NaViTCLIP(cfg.model).eval()
    towers = from_training_model(model, cfg)
    images = [item.image for item in dataset.read(ReadStats())]
    for budget, side in ((None, 8), (36, 6)):
        batches = captured_eval(towers, dataset, budget)
        slots = [(b, s) for b in batches for s in np.flatnonzero(b.valid[:, 0].numpy())]
        assert len(slots) == len(images)
        for (batch, s), image in zip(slots, images):
            assert batch.grid[s, 0].tolist() == [side, side]
            expected, _ = patchify(Image.fromarray(reference_square(image, side * 8, "crop")), side, side, 8)
            np.testing.assert_array_equal(batch.patches[s, : side * side].numpy(), expected)
    # told otherwise: the same run evaluated at native sizes
    native = from_training_model(model, load_config(SQUARE, [*SMALL, "data.resolution.mode=native"]))
    assert {tuple(b.grid[s, 0].tolist()) for b in captured_eval(native, dataset)
            for s in np.flatnonzero(b.valid[:, 0].numpy())} >= {(8, 2), (2, 8)}

    path = export_image_encoder(model, tmp_path / "export", max_tokens_per_image=64, seq_len=64, max_images=1,
                                resolution=cfg.data.resolution)
    assert json.loads((path / "config.json").read_text())["resolution"] == {"mode": "square", "square_fit": "crop",
                                                                       "skip_blank_below": 0}
    encoder = load_image_encoder(path)
    batch = encoder.pack_images(images)
    assert batch.grid[:, 0].tolist() == [[8, 8]] * len(images)
    with torch.no_grad():
        torch.testing.assert_close(encoder(images), towers_embeddings(towers, dataset), atol=1e-5, rtol=1e-4)


def towers_embeddings(towers, dataset) -> torch.Tensor:
    return embed_images(towers, dataset, progress=False).emb


def test_jpeg_decoded_at_draft_size_still_covers_the_square():
    from navit_clip.data.shards import decode_sample

    buffer = io.BytesIO()
    make_tiny_image(640, 320, "RGB", 0).save(buffer, format="JPEG")
    policy = ResolutionPolicy(patch_size=8, max_tokens=64, max_side=8, mode="square")
    sample = decode_sample({"__key__": "k", "jpg": buffer.getvalue(), "txt": b"x"}, 10**8, 8, policy.draft_size)
    assert min(sample.image.size) >= 64 and sample.image.size[0] < 640  # decoded reduced, never below R


@pytest.mark.slow
def test_square_comparison_config_trains_end_to_end(tmp_path):
    from navit_clip.data.digits import make_digit_shards

    digits = make_digit_shards(tmp_path / "digits", train_copies=1, eval_per_class=4, max_train_digits=200,
                               shards_train=2, shards_eval=1)
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "navit_clip", "train", "--config", str(SQUARE), *SMALL,
                           f"data.train_shards={digits['train_shards']}", f"data.eval_shards={digits['eval_shards']}",
                           "data.sequences_per_batch=8", "train.steps=6", "train.log_every=2", "train.ckpt_every=6",
                           "optim.warmup_steps=2", f"train.out_dir={run}"],
                          capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 6 and all(r["images_per_step"] == 8 for r in rows)
    proc = subprocess.run([sys.executable, "-m", "navit_clip", "eval", "--run", str(run)], capture_output=True,
                          text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    details = json.loads((run / "eval" / "zeroshot.json").read_text())["details"]
    assert details["tokens_per_image"] == 64 and details["num_images"] == 40
