"""Exact-fill packing: sequences filled where a shrink can do it, shrunk images are their own
pixels at a smaller grid of the same aspect (never larger), nothing is lost or repeated, and a
shrunk image's embedding is the same alone or packed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from test_model import CTX, P, C, locate, make_image, tiny_config

from navit_clip.config import ConfigError, load_config
from navit_clip.data.exact_fill import ExactFillPacker, make_packer, shrink, smaller_grids
from navit_clip.data.packing import PatchedImage, StreamingPacker, to_packed_batch
from navit_clip.data.spec import evaluation_spec, stream_spec
from navit_clip.model.clip import NaViTCLIP


def aspect_within_one_patch(grid: tuple[int, int], original: tuple[int, int]) -> bool:
    (r, c), (rows, cols) = grid, original
    return abs(c - r * cols / rows) <= 1 + 1e-9 and abs(r - c * rows / cols) <= 1 + 1e-9


def test_smaller_grids_against_brute_force():
    for rows, cols in [(16, 16), (13, 19), (19, 13), (1, 9), (4, 1), (7, 3)]:
        for max_loss in (0, 5, 16, 40):
            expected = {(r, c) for r in range(1, rows + 1) for c in range(1, cols + 1)
                        if rows * cols - max_loss <= r * c < rows * cols and aspect_within_one_patch((r, c), (rows, cols))}
            grids = smaller_grids(rows, cols, max_loss)
            assert set(grids) == expected
            assert [r * c for r, c in grids] == sorted((r * c for r, c in grids), reverse=True)
    assert set(smaller_grids(16, 16, 31)) == {(16, 15), (15, 16), (15, 15)}


def reference_shrink(image: PatchedImage, grid: tuple[int, int]) -> np.ndarray:
    """The image's pixels, resized by PIL to the grid and cut in raster order (written out here)."""
    rows, cols = image.grid
    pixels = image.patches.reshape(rows, cols, P, P, C).transpose(0, 2, 1, 3, 4).reshape(rows * P, cols * P, C)
    small = np.asarray(Image.fromarray(pixels).resize((grid[1] * P, grid[0] * P), Image.Resampling.BICUBIC,
                                                      reducing_gap=None))
    return small.reshape(grid[0], P, grid[1], P, C).transpose(0, 2, 1, 3, 4).reshape(grid[0] * grid[1], P * P * C)


def stream(count: int, seed: int) -> list[PatchedImage]:
    rng = np.random.default_rng(seed)
    return [make_image(f"i{n:03d}", int(rng.integers(3, 7)), int(rng.integers(3, 7)), seed=seed * 1000 + n)
            for n in range(count)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_fill_fills_more_and_shrinks_faithfully(seed):
    images = stream(120, seed)
    by_key = {image.key: image for image in images}
    kwargs = dict(seq_len=64, max_images=6, sequences_per_batch=4, buffer_size=12)
    plain = StreamingPacker(**kwargs)
    plain_batches = list(plain.pack_stream(images))
    packer = ExactFillPacker(patch_size=P, **kwargs)
    batches = list(packer.pack_stream(images))
    seen, shrunk = [], 0
    full = lambda bs: sum(int((b.segment >= 0).sum(1).eq(64).sum()) for b in bs)  # noqa: E731
    for batch in batches:
        batch.validate()
        for s, keys in enumerate(batch.keys):
            for slot, key in enumerate(keys):
                seen.append(key)
                original = by_key[key]
                tokens = batch.segment[s] == slot
                grid = tuple(batch.grid[s, slot].tolist())
                patches = batch.patches[s][tokens].numpy()
                coords = batch.coords[s][tokens].numpy()
                if grid == original.grid:
                    np.testing.assert_array_equal(patches, original.patches)
                    continue
                shrunk += 1
                assert grid[0] <= original.grid[0] and grid[1] <= original.grid[1]  # never upscaled
                assert grid[0] * grid[1] < original.num_tokens
                assert aspect_within_one_patch(grid, original.grid)
                raster = np.stack(np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), indexing="ij"), -1)
                np.testing.assert_array_equal(coords, raster.reshape(-1, 2))  # positions of the new grid
                np.testing.assert_array_equal(patches, reference_shrink(original, grid))
    assert sorted(seen) == sorted(by_key)  # every image once, none lost
    assert shrunk == packer.images_shrunk > 0
    assert full(batches) > full(plain_batches)
    assert packer.padding_fraction < plain.padding_fraction


def test_shrinking_the_first_image_fills_a_sequence_exactly():
    first, waiting = make_image("a", 8, 4, seed=1), make_image("b", 6, 6, seed=2)  # 32 + 36 > 64
    packer = ExactFillPacker(patch_size=P, seq_len=64, max_images=4, sequences_per_batch=1, buffer_size=2)
    assert packer.push(first) == []
    (batch,) = packer.push(waiting)
    assert batch.keys == (("a", "b"),)
    assert int((batch.segment >= 0).sum()) == 64  # no padding
    assert batch.grid[0, :2].tolist() == [[7, 4], [6, 6]]  # a loses one row (4 tokens), b stays whole
    # the plain packer pads half the sequence instead
    plain = StreamingPacker(seq_len=64, max_images=4, sequences_per_batch=1, buffer_size=2)
    plain.push(first)
    assert plain.push(waiting)[0].keys == (("a",),)


def test_an_image_with_dropped_patches_drops_more_instead():
    image = make_image("y", 5, 5, seed=5, keep=0.6)  # 15 of 25 patches
    smaller = shrink(image, 11, None, P)
    assert smaller.grid == image.grid and smaller.num_tokens == 11
    positions = {tuple(c): i for i, c in enumerate(image.coords.tolist())}
    for patch, coord in zip(smaller.patches, smaller.coords.tolist()):
        np.testing.assert_array_equal(patch, image.patches[positions[tuple(coord)]])
    first = make_image("d", 5, 5, seed=6, keep=0.6)
    big = make_image("e", 7, 7, seed=7)  # 15 + 49 = 64 fills exactly whole
    packer = ExactFillPacker(patch_size=P, seq_len=60, max_images=4, sequences_per_batch=1, buffer_size=2)
    packer.push(first)
    (batch,) = packer.push(big)
    assert int((batch.segment >= 0).sum()) == 60  # the dropped image gave 4 more patches
    assert batch.grid[0, :2].tolist() == [[5, 5], [7, 7]]


def test_shrunk_image_embeds_the_same_alone_or_packed():
    torch.manual_seed(0)
    model = NaViTCLIP(tiny_config("sdpa")).eval()
    images = stream(60, 3)
    packer = ExactFillPacker(patch_size=P, seq_len=64, max_images=6, sequences_per_batch=2, buffer_size=12)
    batches = list(packer.pack_stream(images))
    by_key = {image.key: image for image in images}
    checked = 0
    with torch.no_grad():
        for batch in batches:
            embeddings = model.encode_image_slots(batch)
            for keys in batch.keys:
                for key in keys:
                    s, slot = locate(batch, key)
                    grid = tuple(batch.grid[s, slot].tolist())
                    if grid == by_key[key].grid:
                        continue
                    tokens = batch.segment[s] == slot
                    alone_image = PatchedImage(key=key, patches=batch.patches[s][tokens].numpy(),
                                               coords=batch.coords[s][tokens].numpy(), grid=grid,
                                               text=np.zeros(CTX, np.int64))
                    alone = to_packed_batch([[alone_image]], seq_len=64, max_images=1, patch_dim=P * P * C,
                                            text_len=CTX)
                    torch.testing.assert_close(embeddings[s * batch.max_images + slot],
                                               model.encode_image_slots(alone)[0], atol=1e-5, rtol=0)
                    checked += 1
    assert checked > 0


def test_exact_fill_is_one_key_from_config_to_packer():
    cfg = load_config(None, ["data.packing.exact_fill=true", "data.packing.buffer_size=16"])
    spec = stream_spec(cfg)
    assert spec.packing.exact_fill is True
    packer = make_packer(seq_len=spec.seq_len, max_images=spec.max_images, patch_size=spec.patch_size,
                         sequences_per_batch=2, open_sequences=spec.packing.open_sequences,
                         buffer_size=spec.packing.buffer_size, exact_fill=spec.packing.exact_fill)
    assert isinstance(packer, ExactFillPacker) and packer.patch_size == cfg.model.vision.patch_size
    assert type(make_packer(seq_len=64, max_images=4, sequences_per_batch=1, patch_size=P)) is StreamingPacker
    assert evaluation_spec(cfg).packing.exact_fill is False  # evaluation embeds images at their own size
    with pytest.raises(ConfigError, match="data.packing.exact_fill"):
        load_config(None, ["data.packing.exact_fill=true", "data.packing.buffer_size=0"])
