"""pack() and StreamingPacker: layout of each image in its slot, limits, padding, every image once."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from navit_clip.batch import PackedBatch
from navit_clip.data.packing import PatchedImage, StreamingPacker, pack, to_packed_batch

PATCH_DIM = 12  # 2x2 patches, 3 channels
TEXT_LEN = 6


def make_image(key: str, rows: int, cols: int, rng: np.random.Generator) -> PatchedImage:
    n = rows * cols
    coords = np.stack(np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij"), -1).reshape(-1, 2)
    return PatchedImage(key=key, patches=rng.integers(0, 256, (n, PATCH_DIM), dtype=np.uint8),
                        coords=coords.astype(np.int64), grid=(rows, cols),
                        text=rng.integers(1, 49000, TEXT_LEN).astype(np.int64))


def random_images(n: int, seed: int, max_side: int = 8, prefix: str = "img") -> list[PatchedImage]:
    rng = np.random.default_rng(seed)
    return [make_image(f"{prefix}{i:04d}", int(rng.integers(1, max_side + 1)), int(rng.integers(1, max_side + 1)), rng)
            for i in range(n)]


def check_batch(batch: PackedBatch, images: dict[str, PatchedImage], seq_len: int, max_images: int) -> list[str]:
    """Assert the layout of every image in the batch; return the keys seen (slot order)."""
    batch.validate()
    S = batch.num_sequences
    assert batch.seq_len == seq_len and batch.max_images == max_images
    assert batch.patches.shape == (S, seq_len, PATCH_DIM) and batch.patches.dtype == torch.uint8
    assert batch.coords.shape == (S, seq_len, 2)
    assert batch.segment.shape == (S, seq_len)
    assert batch.grid.shape == (S, max_images, 2)
    assert batch.valid.shape == (S, max_images) and batch.valid.dtype == torch.bool
    assert batch.text.shape == (S, max_images, TEXT_LEN)
    assert len(batch.keys) == S
    seen = []
    for s in range(S):
        keys = batch.keys[s]
        assert len(keys) <= max_images
        seg = batch.segment[s].numpy()
        assert int((seg >= 0).sum()) <= seq_len
        # valid slots are exactly the first len(keys) slots
        assert batch.valid[s].tolist() == [True] * len(keys) + [False] * (max_images - len(keys))
        for slot, key in enumerate(keys):
            image = images[key]
            where = np.flatnonzero(seg == slot)
            assert len(where) == image.num_tokens, key
            assert (np.diff(where) == 1).all(), f"{key} is not contiguous"
            lo, hi = where[0], where[-1] + 1
            np.testing.assert_array_equal(batch.patches[s, lo:hi].numpy(), image.patches)
            np.testing.assert_array_equal(batch.coords[s, lo:hi].numpy(), image.coords)
            assert tuple(batch.grid[s, slot].tolist()) == image.grid
            np.testing.assert_array_equal(batch.text[s, slot].numpy(), image.text)
            seen.append(key)
        # empty slots and padding tokens carry zeros
        assert (batch.grid[s, len(keys):] == 0).all() and (batch.text[s, len(keys):] == 0).all()
        pad = seg < 0
        assert (batch.patches[s][torch.from_numpy(pad)] == 0).all()
        assert (batch.coords[s][torch.from_numpy(pad)] == 0).all()
    assert batch.flat_keys() == [k for s in range(S) for k in
                                 list(batch.keys[s]) + [None] * (max_images - len(batch.keys[s]))]
    return seen


def manual_padding(batches: list[PackedBatch]) -> float:
    pad = sum(int((b.segment < 0).sum()) for b in batches)
    total = sum(b.segment.numel() for b in batches)
    return pad / total


# ------------------------------------------------------------------------------------------ pack


@pytest.mark.parametrize("n, seed, seq_len, max_images", [(1, 0, 64, 4), (10, 1, 64, 4), (40, 2, 100, 5),
                                                         (60, 3, 64, 16), (25, 4, 64, 1)])
def test_pack_layout_and_limits(n, seed, seq_len, max_images):
    images = random_images(n, seed)
    batch = pack(images, seq_len=seq_len, max_images=max_images)
    seen = check_batch(batch, {im.key: im for im in images}, seq_len, max_images)
    assert sorted(seen) == sorted(im.key for im in images)
    assert batch.num_images == n
    assert batch.padding_fraction() == pytest.approx(manual_padding([batch]))
    total = sum(im.num_tokens for im in images)
    assert batch.padding_fraction() == pytest.approx(1 - total / (batch.num_sequences * seq_len))


def test_pack_first_fit_decreasing_is_tight():
    rng = np.random.default_rng(0)
    # 4 images of 48 tokens and 4 of 16: FFD packs them into exactly 4 full sequences of 64
    images = [make_image(f"big{i}", 6, 8, rng) for i in range(4)] + [make_image(f"small{i}", 4, 4, rng)
                                                                    for i in range(4)]
    batch = pack(images, seq_len=64, max_images=4)
    assert batch.num_sequences == 4
    assert batch.padding_fraction() == 0.0
    check_batch(batch, {im.key: im for im in images}, 64, 4)


def test_pack_max_images_forces_new_sequences():
    rng = np.random.default_rng(0)
    images = [make_image(f"one{i}", 1, 1, rng) for i in range(10)]
    batch = pack(images, seq_len=64, max_images=3)
    assert batch.num_sequences == 4
    assert [len(k) for k in batch.keys] == [3, 3, 3, 1]


def test_pack_image_larger_than_seq_len_names_key():
    rng = np.random.default_rng(0)
    images = [make_image("ok", 2, 2, rng), make_image("huge-one", 9, 9, rng)]
    with pytest.raises(ValueError, match="huge-one"):
        pack(images, seq_len=64, max_images=4)


def test_pack_empty_raises():
    with pytest.raises(ValueError):
        pack([], seq_len=64, max_images=4)


def test_to_packed_batch_rejects_overflow():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="max_images"):
        to_packed_batch([[make_image(f"a{i}", 1, 1, rng) for i in range(3)]], 16, 2, PATCH_DIM, TEXT_LEN)
    with pytest.raises(ValueError, match="b1"):
        to_packed_batch([[make_image("b0", 3, 3, rng), make_image("b1", 3, 3, rng)]], 16, 4, PATCH_DIM, TEXT_LEN)


def test_validate_catches_broken_batches():
    images = random_images(8, 0)
    batch = pack(images, seq_len=64, max_images=4)
    batch.validate()
    broken = PackedBatch(**{**batch.__dict__, "valid": ~batch.valid})
    with pytest.raises(ValueError, match="valid"):
        broken.validate()
    broken = PackedBatch(**{**batch.__dict__, "grid": batch.grid[:, :2]})
    with pytest.raises(ValueError, match="grid"):
        broken.validate()
    seg = batch.segment.clone()
    seg[0, 0] = 4
    with pytest.raises(ValueError, match="segment"):
        PackedBatch(**{**batch.__dict__, "segment": seg}).validate()


# ------------------------------------------------------------------------------ StreamingPacker


def stream_all(images: list[PatchedImage], **kwargs) -> tuple[StreamingPacker, list[PackedBatch]]:
    packer = StreamingPacker(**kwargs)
    return packer, list(packer.pack_stream(images))


@pytest.mark.parametrize("n, seed, seq_len, max_images, spb, open_seq, max_side", [
    (200, 0, 64, 8, 4, 8, 8),
    (150, 1, 128, 4, 3, 1, 8),
    (97, 2, 64, 16, 2, 4, 4),
    (31, 3, 64, 2, 5, 3, 8),
    (300, 4, 256, 16, 8, 8, 12),
    (1, 5, 64, 4, 4, 8, 8),
])
def test_streaming_every_image_once_with_valid_layout(n, seed, seq_len, max_images, spb, open_seq, max_side):
    images = random_images(n, seed, max_side=max_side)
    packer, batches = stream_all(images, seq_len=seq_len, max_images=max_images, sequences_per_batch=spb,
                                 open_sequences=open_seq)
    by_key = {im.key: im for im in images}
    seen = []
    for batch in batches:
        assert batch.num_sequences == spb  # fixed S, the last batch padded with empty sequences
        seen += check_batch(batch, by_key, seq_len, max_images)
    assert sorted(seen) == sorted(by_key), "every pushed image comes out exactly once"
    assert len(seen) == len(set(seen))
    assert packer.images_emitted == n
    assert packer.padding_fraction == pytest.approx(manual_padding(batches))
    # nothing is left behind after flush
    assert packer.flush() == []


def test_streaming_last_batch_padded_with_empty_sequences():
    rng = np.random.default_rng(0)
    images = [make_image(f"full{i}", 8, 8, rng) for i in range(5)]  # each fills a 64-token sequence
    packer = StreamingPacker(seq_len=64, max_images=4, sequences_per_batch=4, open_sequences=2)
    emitted = []
    for image in images:
        emitted += packer.push(image)
    assert len(emitted) == 1 and emitted[0].keys == (("full0",), ("full1",), ("full2",), ("full3",))
    assert emitted[0].padding_fraction() == 0.0
    rest = packer.flush()
    assert len(rest) == 1
    last = rest[0]
    assert last.num_sequences == 4
    assert last.keys[0] == ("full4",) and all(k == () for k in last.keys[1:])
    assert not last.valid[1:].any() and (last.segment[1:] == -1).all()
    last.validate()
    assert packer.padding_fraction == pytest.approx(manual_padding(emitted + rest)) == pytest.approx(3 / 8)


def test_streaming_push_emits_only_full_batches():
    images = random_images(120, 7)
    packer = StreamingPacker(seq_len=64, max_images=6, sequences_per_batch=3, open_sequences=4)
    for image in images:
        for batch in packer.push(image):
            assert batch.num_sequences == 3
            assert all(len(k) >= 1 for k in batch.keys), "push never emits empty sequences"


def test_streaming_padding_fraction_zero_before_emit():
    packer = StreamingPacker(seq_len=64, max_images=4, sequences_per_batch=2)
    assert packer.padding_fraction == 0.0
    assert packer.push(random_images(1, 0)[0]) == []
    assert packer.padding_fraction == 0.0


def test_streaming_image_larger_than_seq_len_names_key():
    rng = np.random.default_rng(0)
    packer = StreamingPacker(seq_len=32, max_images=4, sequences_per_batch=2)
    packer.push(make_image("fine", 4, 4, rng))
    with pytest.raises(ValueError, match="too-big-7"):
        packer.push(make_image("too-big-7", 6, 6, rng))


def test_streaming_best_fit_fills_holes():
    """Best fit: a small image goes to the open sequence with the least room that still fits."""
    rng = np.random.default_rng(0)
    packer = StreamingPacker(seq_len=64, max_images=8, sequences_per_batch=1, open_sequences=4)
    packer.push(make_image("a40", 5, 8, rng))  # seq A: 24 free
    packer.push(make_image("b50", 5, 10, rng))  # does not fit A -> seq B: 14 free
    out = packer.push(make_image("c14", 2, 7, rng))  # best fit is B (fills it exactly -> closed, emitted)
    assert len(out) == 1 and out[0].keys == (("b50", "c14"),)
    assert out[0].padding_fraction() == 0.0
    out = packer.push(make_image("d24", 4, 6, rng))
    assert len(out) == 1 and out[0].keys == (("a40", "d24"),)


def test_streaming_much_less_padding_than_one_image_per_sequence():
    images = random_images(400, 11, max_side=10)
    seq_len = 256
    packer, batches = stream_all(images, seq_len=seq_len, max_images=16, sequences_per_batch=4, open_sequences=8)
    naive = 1 - sum(im.num_tokens for im in images) / (len(images) * seq_len)
    assert naive > 0.7
    assert packer.padding_fraction < 0.1
    assert packer.padding_fraction < naive / 5
    assert packer.padding_fraction == pytest.approx(manual_padding(batches))


def test_streaming_reusable_after_flush():
    packer = StreamingPacker(seq_len=64, max_images=4, sequences_per_batch=2)
    first = list(packer.pack_stream(random_images(20, 0, prefix="x")))
    second = list(packer.pack_stream(random_images(20, 1, prefix="y")))
    keys1 = {k for b in first for seq in b.keys for k in seq}
    keys2 = {k for b in second for seq in b.keys for k in seq}
    assert len(keys1) == 20 and all(k.startswith("x") for k in keys1)
    assert len(keys2) == 20 and all(k.startswith("y") for k in keys2)
    assert packer.images_emitted == 40


def test_streaming_sequence_closes_when_it_holds_max_images():
    """A sequence with E_max images is closed at once, even with room left, so it can be emitted."""
    rng = np.random.default_rng(0)
    packer = StreamingPacker(seq_len=64, max_images=2, sequences_per_batch=1, open_sequences=4)
    assert packer.push(make_image("p0", 1, 1, rng)) == []
    out = packer.push(make_image("p1", 1, 2, rng))
    assert len(out) == 1 and out[0].keys == (("p0", "p1"),)
    assert out[0].padding_fraction() == pytest.approx(61 / 64)
    assert packer.flush() == []


# ------------------------------------------------------------------- lookahead (buffered) packer

import itertools as _itertools

from navit_clip.data.packing import best_subset


@pytest.mark.parametrize("seed", range(30))
def test_best_subset_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    sizes = [int(x) for x in rng.integers(1, 40, int(rng.integers(0, 11)))]
    capacity = int(rng.integers(0, 100))
    max_items = int(rng.integers(1, 12))
    chosen = best_subset(sizes, capacity, max_items)
    assert len(set(chosen)) == len(chosen) and all(0 <= i < len(sizes) for i in chosen)
    total = sum(sizes[i] for i in chosen)
    assert total <= capacity and len(chosen) <= max_items
    best = max((sum(c) for r in range(0, min(len(sizes), max_items) + 1)
                for c in _itertools.combinations(sizes, r) if sum(c) <= capacity), default=0)
    if max_items >= len(sizes):
        assert total == best  # exact whenever the item limit does not bind
    else:
        assert total <= best


@pytest.mark.parametrize("n, seed, seq_len, max_images, spb, buffer, max_side", [
    (200, 0, 64, 8, 4, 16, 8), (150, 1, 128, 4, 3, 64, 8), (97, 2, 64, 16, 2, 5, 4), (31, 3, 64, 2, 5, 64, 8),
    (1, 5, 64, 4, 4, 8, 8), (300, 6, 256, 16, 8, 256, 12)])
def test_lookahead_every_image_once_with_valid_layout(n, seed, seq_len, max_images, spb, buffer, max_side):
    images = random_images(n, seed, max_side=max_side)
    packer = StreamingPacker(seq_len=seq_len, max_images=max_images, sequences_per_batch=spb, buffer_size=buffer)
    batches = list(packer.pack_stream(images))
    by_key = {im.key: im for im in images}
    seen = []
    for batch in batches:
        assert batch.num_sequences == spb
        seen += check_batch(batch, by_key, seq_len, max_images)
    assert sorted(seen) == sorted(by_key) and len(seen) == len(set(seen))
    assert packer.padding_fraction == pytest.approx(manual_padding(batches))


def test_lookahead_waits_at_most_buffer_sequences():
    """The oldest buffered example always opens the next sequence: no example waits forever."""
    images = random_images(500, 9, max_side=10)
    buffer = 32
    packer = StreamingPacker(seq_len=128, max_images=16, sequences_per_batch=1, buffer_size=buffer)
    arrival = {im.key: i for i, im in enumerate(images)}
    emitted = 0
    for i, image in enumerate(images):
        for batch in packer.push(image):
            emitted += 1
            for key in batch.keys[0]:
                assert i - arrival[key] < buffer * 16, "an example stayed in the buffer too long"
        # everything pushed more than `buffer` examples ago has left the buffer
        assert len(packer._buffer) < buffer


def test_lookahead_pads_less_than_placing_on_arrival_on_real_sizes():
    import csv
    from pathlib import Path
    from navit_clip.data.resolution import fit_grid
    path = Path(__file__).resolve().parents[2] / "shared" / "data" / "image_sizes_laion_aesthetics.csv"
    if not path.exists():
        pytest.skip("image size CSVs not available")
    with path.open() as f:
        sizes = [(int(r["width"]), int(r["height"])) for r in csv.DictReader(f)][:3000]
    rng = np.random.default_rng(0)

    def padding(**kw) -> float:
        packer = StreamingPacker(seq_len=1024, max_images=32, sequences_per_batch=8, **kw)
        for i, (w, h) in enumerate(sizes):
            rows, cols = fit_grid(w, h, 16, int(rng.integers(64, 257)), 10_000)
            n = rows * cols
            packer.push(PatchedImage(str(i), np.zeros((n, 1), np.uint8), np.zeros((n, 2), np.int64), (rows, cols),
                                     np.zeros(1, np.int64)))
        return packer.padding_fraction

    arrival, lookahead = padding(open_sequences=8), padding(buffer_size=64)
    assert lookahead < 0.005 < arrival


# ------------------------------------------------------------------------------ repeated keys


def image_of(key: str, n: int, seed: int) -> PatchedImage:
    """An image of n tokens in one row; a fresh object (and fresh arrays) on every call."""
    rng = np.random.default_rng(seed)
    coords = np.stack([np.zeros(n), np.arange(n)], -1).astype(np.int64)
    return PatchedImage(key=key, patches=rng.integers(0, 256, (n, PATCH_DIM), dtype=np.uint8), coords=coords,
                        grid=(1, n), text=rng.integers(1, 49000, TEXT_LEN).astype(np.int64))


def test_streaming_two_open_sequences_starting_with_the_same_key():
    # Two open sequences begin with equal copies of image "a" (as when the data loops into its next
    # epoch); closing one of them must not compare the images' arrays.
    images = [image_of("a", 100, 0), image_of("d", 100, 1), image_of("a", 100, 0), image_of("x", 150, 2),
              image_of("e", 200, 3)]
    packer, batches = stream_all(images, seq_len=256, max_images=4, sequences_per_batch=1, open_sequences=2)
    keys = [k for batch in batches for k in batch.keys]
    assert sorted(keys) == [("a", "d"), ("a", "x"), ("e",)]
    assert packer.images_emitted == 5


@pytest.mark.parametrize("buffer, lag", [(0, 2), (0, 3), (6, 2)])
def test_streaming_same_shard_twice(buffer, lag):
    # The same shard given as two sources, the second a few samples behind the first: every copy
    # of every image comes out once.
    first = random_images(60, seed=0, max_side=8)
    second = random_images(60, seed=0, max_side=8)  # equal contents, distinct objects
    stream = first[:lag] + [im for pair in zip(first[lag:], second) for im in pair] + second[60 - lag:]
    packer, batches = stream_all(stream, seq_len=64, max_images=8, sequences_per_batch=2, open_sequences=3,
                                 buffer_size=buffer)
    by_key = {im.key: im for im in first}
    seen = []
    for batch in batches:
        seen += check_batch(batch, by_key, 64, 8)
    assert sorted(seen) == sorted(list(by_key) * 2)
    assert packer.images_emitted == 120
