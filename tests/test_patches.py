"""patchify / unpatchify: exact round trip, (row, col) coords in row-major order, (p1 p2 c) layout."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from navit_clip.data.patches import patchify, unpatchify


def random_image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "L": 1}[mode]
    pixels = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels[:, :, 0] if channels == 1 else pixels, mode)


@pytest.mark.parametrize("rows, cols, patch", [(1, 1, 8), (3, 5, 8), (5, 3, 4), (2, 7, 16), (4, 4, 14)])
def test_round_trip_exact_at_native_size(rows, cols, patch):
    image = random_image(cols * patch, rows * patch, seed=rows * 10 + cols)
    patches, coords = patchify(image, rows, cols, patch)
    assert patches.shape == (rows * cols, patch * patch * 3) and patches.dtype == np.uint8
    assert coords.shape == (rows * cols, 2) and coords.dtype == np.int64
    np.testing.assert_array_equal(unpatchify(patches, rows, cols, patch), np.asarray(image))


@pytest.mark.parametrize("size, rows, cols", [((200, 50), 2, 8), ((50, 200), 8, 2), ((37, 91), 5, 3),
                                               ((16, 16), 3, 3), ((640, 480), 6, 8)])
def test_round_trip_equals_resized_image(size, rows, cols):
    patch = 8
    image = random_image(*size, seed=size[0])
    patches, _ = patchify(image, rows, cols, patch)
    resized = image.resize((cols * patch, rows * patch), Image.Resampling.BICUBIC, reducing_gap=None)
    restored = unpatchify(patches, rows, cols, patch)
    assert restored.shape == (rows * patch, cols * patch, 3)
    np.testing.assert_array_equal(restored, np.asarray(resized))


def test_resize_preserves_content_of_smooth_image():
    """A downscaled smooth gradient stays close to the analytic gradient (the resize is real)."""
    width, height, patch, rows, cols = 256, 128, 8, 4, 8
    xs = np.tile(np.linspace(0, 255, width), (height, 1))
    pixels = np.stack([xs, xs, xs], axis=-1).astype(np.uint8)
    patches, _ = patchify(Image.fromarray(pixels), rows, cols, patch)
    restored = unpatchify(patches, rows, cols, patch).astype(float)
    expected = np.linspace(0, 255, cols * patch)
    assert np.abs(restored[:, :, 0].mean(axis=0) - expected).max() < 6


@pytest.mark.parametrize("rows, cols", [(1, 1), (2, 3), (4, 1), (1, 6), (3, 3)])
def test_coords_row_major(rows, cols):
    _, coords = patchify(random_image(cols * 4, rows * 4), rows, cols, 4)
    expected = [(r, c) for r in range(rows) for c in range(cols)]
    assert [tuple(x) for x in coords.tolist()] == expected
    index = np.arange(rows * cols)
    np.testing.assert_array_equal(coords[:, 0], index // cols)
    np.testing.assert_array_equal(coords[:, 1], index % cols)


@pytest.mark.parametrize("y, x, ch", [(0, 0, 0), (0, 0, 2), (5, 9, 1), (7, 23, 2), (13, 4, 0), (15, 31, 2)])
def test_pixel_lands_at_expected_index(y, x, ch):
    """Layout (p1 p2 c): pixel (y, x, ch) is patch (y//P)*cols + x//P, feature ((y%P)*P + x%P)*C + ch."""
    patch, rows, cols = 8, 2, 4
    pixels = np.zeros((rows * patch, cols * patch, 3), dtype=np.uint8)
    pixels[y, x, ch] = 200
    patches, coords = patchify(Image.fromarray(pixels), rows, cols, patch)
    index = (y // patch) * cols + x // patch
    feature = ((y % patch) * patch + x % patch) * 3 + ch
    assert patches[index, feature] == 200
    assert int(patches.astype(np.int64).sum()) == 200  # and nowhere else
    assert tuple(coords[index]) == (y // patch, x // patch)


def test_layout_on_distinct_values():
    """Every value of a fully distinct image appears where the (p1 p2 c) layout puts it."""
    patch, rows, cols = 2, 2, 3
    pixels = (np.arange(rows * patch * cols * patch * 3) % 256).astype(np.uint8).reshape(rows * patch, cols * patch, 3)
    patches, _ = patchify(Image.fromarray(pixels), rows, cols, patch)
    for r in range(rows):
        for c in range(cols):
            block = pixels[r * patch:(r + 1) * patch, c * patch:(c + 1) * patch, :]
            np.testing.assert_array_equal(patches[r * cols + c], block.reshape(-1))


def test_grayscale_has_one_channel():
    image = random_image(16, 8, mode="L")
    patches, coords = patchify(image, 1, 2, 8)
    assert patches.shape == (2, 64)
    restored = unpatchify(patches, 1, 2, 8, channels=1)
    np.testing.assert_array_equal(restored[:, :, 0], np.asarray(image))


def test_patches_are_contiguous_and_independent():
    image = random_image(32, 32)
    patches, _ = patchify(image, 4, 4, 8)
    assert patches.flags["C_CONTIGUOUS"]
    before = np.asarray(image).copy()
    patches[:] = 0
    np.testing.assert_array_equal(np.asarray(image), before)


# ---------------------------------------------------------------------------------------------
# Blank patches: data.resolution.skip_blank_below
# ---------------------------------------------------------------------------------------------

def canvas_with_mark(width: int = 64, height: int = 24, mark: tuple[int, int] = (44, 12), jpeg_noise: int = 0,
                     seed: int = 0) -> Image.Image:
    """A flat grey canvas (± jpeg_noise levels of noise) with one 6×6 bright square at `mark` (x, y)."""
    rng = np.random.default_rng(seed)
    pixels = np.full((height, width, 3), 60, dtype=np.int16) + rng.integers(-jpeg_noise, jpeg_noise + 1, (height, width, 3))
    x, y = mark
    pixels[y:y + 6, x:x + 6] = 230
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


@pytest.mark.parametrize("below, noise", [(16, 0), (16, 5), (1, 0)])
def test_blank_patches_are_left_out_and_the_rest_keep_their_place(below, noise):
    from navit_clip.data.patches import patch_image
    from navit_clip.data.resolution import ResolutionPolicy

    image = canvas_with_mark(jpeg_noise=noise)  # 8×3 patches of 8 px; the mark covers (1, 5) (1, 6) (2, 5) (2, 6)
    whole = patch_image("a", image, ResolutionPolicy(patch_size=8, max_tokens=64, max_side=32))
    skipped = patch_image("a", image, ResolutionPolicy(patch_size=8, max_tokens=64, max_side=32, skip_blank_below=below))
    assert whole.num_tokens == 24 and skipped.grid == whole.grid == (3, 8)
    assert sorted(map(tuple, skipped.coords.tolist())) == [(1, 5), (1, 6), (2, 5), (2, 6)]
    kept_rows = [int(np.flatnonzero((whole.coords == c).all(1))[0]) for c in skipped.coords]
    np.testing.assert_array_equal(skipped.patches, whole.patches[kept_rows])  # the same pixels, unchanged


def test_an_image_with_nothing_but_blank_keeps_its_most_varied_patch():
    from navit_clip.data.patches import non_blank

    patches = np.full((5, 12), 100, dtype=np.uint8)
    patches[3, 0] = 104  # spread 4, the largest; still below 16
    assert non_blank(patches, 16).tolist() == [False, False, False, True, False]
    assert non_blank(patches, 4).tolist() == [False, False, False, True, False]
    assert non_blank(patches, 5).sum() == 1


def test_evaluation_and_the_export_leave_out_what_training_left_out(tmp_path):
    """The training run's sizing travels to evaluation's towers and into the export's config, and
    the exported encoder packs a plain image into the same tokens as the training stream."""
    import torch

    from navit_clip.config import load_config
    from navit_clip.data.patches import patch_image
    from navit_clip.data.resolution import ImageSizing
    from navit_clip.data.spec import stream_spec
    from navit_clip.eval.towers import from_training_model
    from navit_clip.export import export_image_encoder, load_image_encoder
    from navit_clip.model.clip import NaViTCLIP

    cfg = load_config(None, ["data.resolution.skip_blank_below=16", "model.vision.width=32", "model.vision.depth=1",
                             "model.vision.heads=2", "model.text.width=32", "model.text.depth=1", "model.text.heads=2"])
    model = NaViTCLIP(cfg.model)
    assert from_training_model(model, cfg).sizing == ImageSizing(skip_blank_below=16)
    path = export_image_encoder(model, tmp_path / "export", max_tokens_per_image=cfg.data.resolution.max_tokens,
                                seq_len=cfg.data.seq_len, max_images=cfg.data.max_images, resolution=cfg.data.resolution)
    encoder = load_image_encoder(path)
    assert encoder.sizing == ImageSizing(skip_blank_below=16)
    image = canvas_with_mark()
    batch = encoder.pack_images([image])
    trained = patch_image("0", image, stream_spec(cfg).resolution)
    image_tokens = batch.segment[0] == 0
    assert int(image_tokens.sum()) == trained.num_tokens == 4
    assert torch.equal(batch.coords[0][image_tokens], torch.from_numpy(trained.coords))


@pytest.mark.parametrize("mode", ["native", "sampled", "square"])
def test_a_greyscale_image_makes_the_patches_of_its_rgb_copy(mode):
    """A greyscale image is resized as one channel and only then made RGB: the same tokens as
    converting it first (what every image went through before), for a third of the work."""
    from navit_clip.data.patches import patch_image
    from navit_clip.data.resolution import ResolutionPolicy

    policy = ResolutionPolicy(patch_size=8, max_side=32, mode=mode, min_tokens=16, max_tokens=64, skip_blank_below=16)
    for seed, (width, height) in enumerate([(37, 201), (300, 90), (64, 64), (9, 13)]):
        grey = canvas_with_mark(jpeg_noise=3, seed=seed).convert("L").resize((width, height))
        one = patch_image("a", grey, policy, rng=np.random.default_rng(seed))
        three = patch_image("a", grey.convert("RGB"), policy, rng=np.random.default_rng(seed))
        assert one.patches.shape[1] == 8 * 8 * 3
        np.testing.assert_array_equal(one.patches, three.patches)
        np.testing.assert_array_equal(one.coords, three.coords)


@pytest.mark.parametrize("mode", ["RGBA", "P", "I;16", "1"])
def test_any_other_image_mode_becomes_rgb_patches(mode):
    from navit_clip.data.patches import patch_image
    from navit_clip.data.resolution import ResolutionPolicy

    image = random_image(40, 24, seed=3).convert(mode)
    patched = patch_image("a", image, ResolutionPolicy(patch_size=8, max_tokens=64, max_side=32))
    reference = patch_image("a", image.convert("RGB"), ResolutionPolicy(patch_size=8, max_tokens=64, max_side=32))
    assert patched.patches.shape == (15, 8 * 8 * 3)
    np.testing.assert_array_equal(patched.patches, reference.patches)
