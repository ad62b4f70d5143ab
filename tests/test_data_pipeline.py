"""The packed stream on a shard set full of bad samples: every bad sample counted by reason, none
fatal, every good sample once per epoch, and ranks that never wait on each other."""

from __future__ import annotations

import io
import itertools
import os
import struct
import zlib
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from navit_clip.data.dropping import DropPolicy
from navit_clip.data.loader import PackedStream, make_loader
from navit_clip.data.shards import SKIP_REASONS, ShardError, expand_shards, skip_counts
from navit_clip.data.spec import StreamSpec

from conftest import stream_from_config, write_tar
from processes import free_port, spawn_and_wait


def image_bytes(width: int, height: int, seed: int, fmt: str = "PNG") -> bytes:
    ys, xs = np.mgrid[0:height, 0:width]
    pixels = np.stack([xs * 7 + seed, ys * 5, xs + ys], -1) % 256
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format=fmt)
    return buffer.getvalue()


def forged_png(width: int, height: int) -> bytes:
    """A PNG header claiming width x height pixels (a decompression bomb) with almost no data."""
    data = bytearray(image_bytes(4, 4, 0))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


GOOD_SIZES = [(40, 30), (64, 64), (100, 20), (20, 100), (33, 47)]
# (shard, key, members, reason it is skipped)
BAD = [
    (0, "corrupt", [("corrupt.png", os.urandom(400)), ("corrupt.txt", b"garbage bytes")], "undecodable_image"),
    (0, "truncated", [("truncated.jpg", image_bytes(64, 48, 1, "JPEG")[:300]), ("truncated.txt", b"cut off")],
     "undecodable_image"),
    (1, "tiny", [("tiny.png", image_bytes(8, 12, 2)), ("tiny.txt", b"below one patch")], "image_too_small"),
    (1, "nocap", [("nocap.png", image_bytes(48, 48, 3))], "no_caption"),
    (2, "bomb", [("bomb.png", forged_png(12000, 9000)), ("bomb.txt", b"decompression bomb")], "image_too_large"),
    (2, "emptycap", [("emptycap.png", image_bytes(48, 48, 4)), ("emptycap.txt", b"  ")], "empty_caption"),
    (3, "noimage", [("noimage.txt", b"caption only")], "no_image"),
]
EXPECTED_SKIPS = Counter(reason for *_, reason in BAD)


@pytest.fixture(scope="module")
def bad_shard_set(tmp_path_factory) -> tuple[str, list[str]]:
    """4 shards: 5 good samples each (one of them a large 900x700 JPEG), bad samples in between."""
    directory = tmp_path_factory.mktemp("bad_shard_set")
    good: list[str] = []
    for shard in range(4):
        members = []
        for i, (w, h) in enumerate(GOOD_SIZES):
            key = f"s{shard}good{i}"
            if i == 4 and shard == 2:
                members += [(f"{key}.jpg", image_bytes(900, 700, shard, "JPEG"))]
            else:
                members += [(f"{key}.png", image_bytes(w, h, 10 * shard + i))]
            members += [(f"{key}.txt", f"good sample {key}".encode())]
            good.append(key)
            for bad_shard, _, bad_members, _ in BAD:  # bad samples after the second good one
                if bad_shard == shard and i == 1:
                    members += bad_members
        write_tar(directory / f"mixed-{shard:06d}.tar", members)
    return str(directory / "mixed-{000000..000003}.tar"), good


BASE = ["model.vision.patch_size=16", "model.vision.max_grid_side=16", "model.text.context_length=12",
        "data.seq_len=64", "data.max_images=6", "data.sequences_per_batch=2", "data.resolution.max_tokens=32",
        "data.resolution.min_tokens=4", "data.shuffle_buffer=4", "data.packing.buffer_size=8"]


def spec_for(shards: str, *overrides: str, **fields) -> StreamSpec:
    return stream_from_config(shards, [*BASE, *overrides], **{"loop": False, **fields})


def keys_of(batches) -> list[str]:
    return [k for b in batches for seq in b.keys for k in seq]


@pytest.mark.parametrize("world, num_workers", [(1, 0), (2, 2), (1, 3)])
def test_every_bad_sample_counted_every_good_sample_once(bad_shard_set, world, num_workers):
    shards, good = bad_shard_set
    keys: list[str] = []
    skipped: Counter = Counter()
    for rank in range(world):
        for batch in make_loader(spec_for(shards), rank=rank, world=world, num_workers=num_workers):
            batch.validate()
            keys += keys_of([batch])
            skipped.update(batch.skipped_by_reason)
            assert batch.skipped_samples == sum(batch.skipped_by_reason.values())
    assert sorted(keys) == sorted(good), "every good sample exactly once per epoch"
    assert skipped == EXPECTED_SKIPS


def test_bad_samples_counted_once_per_epoch_when_looping(bad_shard_set):
    shards, good = bad_shard_set
    spec = spec_for(shards, loop=True)
    per_epoch = len(list(PackedStream(replace(spec, loop=False))))
    batches = list(itertools.islice(iter(PackedStream(spec)), 4 * per_epoch))
    counts = Counter(keys_of(batches))
    assert set(counts) == set(good)
    skipped = sum((Counter(b.skipped_by_reason) for b in batches), Counter())
    epochs_begun = skipped["no_image"]  # one per epoch begun
    assert epochs_begun >= 3
    assert skipped == Counter({r: n * epochs_begun for r, n in EXPECTED_SKIPS.items()})


def test_skip_counts_fixed_order_with_other_bucket():
    counts = skip_counts({"no_caption": 2, "bad_patches": 3, "missing_text": 1, "image_too_small": 4})
    assert len(counts) == len(SKIP_REASONS)
    assert counts[SKIP_REASONS.index("no_caption")] == 2
    assert counts[SKIP_REASONS.index("image_too_small")] == 4
    assert counts[-1] == 4 and sum(counts) == 10


def test_pipe_shards_refused_unless_allowed(tmp_path):
    with pytest.raises(ShardError, match="pipe"):
        expand_shards("pipe:cat /etc/hostname")
    assert expand_shards("pipe:cat x-{0..1}.tar", allow_pipe=True) == ["pipe:cat x-0.tar", "pipe:cat x-1.tar"]


# ------------------------------------------------------------------------ sources, resampling


def test_weighted_sources_single_pass_reads_each_once(bad_shard_set, tiny_shards):
    shards, good = bad_shard_set
    spec = spec_for(f"{shards} ; {tiny_shards.spec}", "data.sources.weights=3,1")
    keys = keys_of(PackedStream(spec))
    assert sorted(keys) == sorted(good + list(tiny_shards.keys))


def test_weighted_sources_resampled_mix(bad_shard_set, tiny_shards):
    shards, good = bad_shard_set
    spec = spec_for(f"{shards};{tiny_shards.spec}", "data.sources.weights=0.8,0.2", "data.sources.resampled=true",
                    loop=True)
    keys = keys_of(itertools.islice(iter(PackedStream(spec)), 60))
    share = sum(k.startswith("s") for k in keys) / len(keys)
    assert 0.7 < share < 0.9, share
    with pytest.raises(ShardError, match="sources.weights"):
        PackedStream(replace(spec, sources=replace(spec.sources, weights="1,2,3")))
    with pytest.raises(ValueError, match="single pass"):
        PackedStream(replace(spec, loop=False))


def test_resampled_stream_is_seeded_and_epoch_aware(bad_shard_set):
    shards, _ = bad_shard_set
    spec = spec_for(shards, "data.sources.resampled=true", "data.sources.steps_per_epoch=3", loop=True)
    a = keys_of(itertools.islice(iter(PackedStream(spec)), 9))
    b = keys_of(itertools.islice(iter(PackedStream(spec)), 9))
    assert a == b
    c = keys_of(itertools.islice(iter(PackedStream(replace(spec, seed=5))), 9))
    assert a != c
    # every rank reads every shard in resampled mode: rank 1 sees samples from all four shards
    keys = keys_of(itertools.islice(iter(PackedStream(spec, rank=1, world=2)), 20))
    assert {k[:2] for k in keys} == {"s0", "s1", "s2", "s3"}


def test_dropping_in_stream_keeps_grid_and_true_coords(tiny_shards):
    spec = spec_for(tiny_shards.spec, "data.drop.kind=constant", "data.drop.rate=0.5", "data.resolution.max_tokens=32",
                    shuffle_buffer=0)
    full = {k: b for b in PackedStream(replace(spec, drop=DropPolicy())) for k in keys_of([b])}
    for batch in PackedStream(spec):
        for s, keys in enumerate(batch.keys):
            for slot, key in enumerate(keys):
                rows, cols = batch.grid[s, slot].tolist()
                where = (batch.segment[s] == slot).nonzero().flatten()
                assert len(where) == max(1, round(rows * cols * 0.5))
                coords = batch.coords[s, where]
                assert (coords[:, 0] < rows).all() and (coords[:, 1] < cols).all()
                assert len({tuple(c) for c in coords.tolist()}) == len(where)
                # each kept patch is the undropped image's patch at the same (row, col)
                ref = full[key]
                rs, rslot = next((i, ks.index(key)) for i, ks in enumerate(ref.keys) if key in ks)
                ref_where = (ref.segment[rs] == rslot).nonzero().flatten()
                ref_patch = {tuple(c): p for c, p in zip(ref.coords[rs, ref_where].tolist(), ref.patches[rs, ref_where])}
                for c, p in zip(coords.tolist(), batch.patches[s, where]):
                    assert torch.equal(ref_patch[tuple(c)], p)


# ------------------------------------------------------------------ ranks never wait on another


WORLD = 2



def _rank_worker(rank: int, port: int, shards: str, out: str, steps: int) -> None:
    import torch.distributed as tdist

    from navit_clip import dist

    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    tdist.init_process_group("gloo", rank=rank, world_size=WORLD)
    # rank 0 reads 4 shards, rank 1 3: uneven shares and different bad samples, yet both run every step
    spec = spec_for(shards, loop=True)
    loader = iter(make_loader(spec, rank=rank, world=WORLD, num_workers=1))
    images = []
    for _ in range(steps):
        batch = next(loader)
        total = dist.all_reduce_sum(torch.tensor([float(batch.num_sequences)]))
        images.append(batch.num_images)
        assert total.item() == WORLD * spec.sequences_per_batch
    torch.save({"images": images, "keys": []}, Path(out) / f"rank{rank}.pt")
    tdist.barrier()  # a rank that tears down while its peer still sends can abort inside gloo
    tdist.destroy_process_group()


def test_ranks_never_wait_on_each_other(bad_shard_set, tiny_shards, tmp_path):
    shards, _ = bad_shard_set
    uneven = f"{shards},{','.join(tiny_shards.paths[:3])}"
    steps = 25  # several epochs of the smaller rank's share
    spawn_and_wait(_rank_worker, (free_port(), uneven, str(tmp_path), steps), WORLD, 240,
                   "a rank waited: the ranks' steps")
    for rank in range(WORLD):
        images = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)["images"]
        assert len(images) == steps and min(images) >= 1


# ------------------------------------------------------------------------ JPEG draft decoding


def test_jpeg_decoded_small_but_sized_from_native(tmp_path):
    """A large JPEG is decoded at a reduced size, yet its grid is the one of its native size, and
    its patches are close to those of a full decode + resize."""
    from navit_clip.data.patches import patch_image
    from navit_clip.data.resolution import ResolutionPolicy, fit_grid
    from navit_clip.data.shards import ReadStats, ShardSplit, read_samples

    ys, xs = np.mgrid[0:1000, 0:1500]  # photo-like: smooth shapes plus sensor noise
    pixels = np.stack([np.sin(xs / 37) * 100 + 128, np.cos(ys / 23) * 100 + 128, (xs + ys) / 10], -1)
    pixels = (pixels + np.random.default_rng(0).integers(0, 30, pixels.shape)).clip(0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    big = buffer.getvalue()
    path = write_tar(tmp_path / "jpeg.tar", [("big.jpg", big), ("big.txt", b"a large photo")])
    spec = spec_for(path, "data.resolution.max_tokens=256", "model.vision.max_grid_side=16", "data.seq_len=256")
    batch = next(iter(PackedStream(spec)))
    assert tuple(batch.grid[0, 0].tolist()) == fit_grid(1500, 1000, 16, 256, 16) == (11, 16)
    stream = PackedStream(spec)
    sample = next(read_samples(ShardSplit((path,)), ReadStats(), draft=stream.draft))
    assert sample.native_size == (1500, 1000) and sample.image.size[0] < 1500
    policy = ResolutionPolicy(16, 256, 16)
    full = Image.open(io.BytesIO(big)).convert("RGB")
    reference = patch_image("big", full, policy, np.zeros(1, np.int64))
    drafted = patch_image("big", sample.image, policy, np.zeros(1, np.int64), native_size=sample.native_size)
    assert drafted.grid == reference.grid
    diff = np.abs(drafted.patches.astype(int) - reference.patches.astype(int))
    assert diff.mean() < 2.0, diff.mean()  # of 255: the DCT-scaled decode is a fine downscale


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_replays_resampled_dropped_sampled_stream(bad_shard_set, num_workers):
    """Resuming (replay + skip) reproduces the exact batches with every stochastic feature on."""
    from navit_clip.data.loader import ResumableBatches

    shards, _ = bad_shard_set
    spec = spec_for(shards, "data.sources.resampled=true", "data.sources.steps_per_epoch=3",
                    "data.resolution.mode=side_normal", "data.drop.kind=beta", "data.drop.beta_a=2",
                    "data.drop.beta_b=5", "data.drop.max_rate=0.5", "data.packing.buffer_size=8", loop=True)
    reference = list(itertools.islice(ResumableBatches(make_loader(spec, num_workers=num_workers)), 7))
    resumed = ResumableBatches(make_loader(spec, num_workers=num_workers), state={"batches": 4})
    for expected in reference[4:]:
        got = next(resumed)
        assert got.keys == expected.keys
        for name in ("patches", "coords", "segment", "grid", "valid", "text"):
            assert torch.equal(getattr(got, name), getattr(expected, name)), name


# --------------------------------------------------------------- skips reach the training metrics


@pytest.mark.slow
def test_training_metrics_log_skips_by_reason(bad_shard_set, tmp_path):
    """A short real training run (DeepSpeed, 1 process) on the bad shard set: metrics.jsonl
    reports the skipped samples by reason, and the run is not stopped by them."""
    import json
    import subprocess
    import sys

    shards, _ = bad_shard_set
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT")}
    args = ["train", "model.vision.patch_size=16", "model.vision.width=32", "model.vision.depth=1",
            "model.vision.heads=2", "model.vision.max_grid_side=16", "model.text.width=32", "model.text.depth=1",
            "model.text.heads=2", "model.text.context_length=12", "model.embed_dim=32", "data.seq_len=64",
            "data.max_images=6", "data.sequences_per_batch=2", "data.resolution.max_tokens=32",
            "data.resolution.min_tokens=4", "data.num_workers=1", "data.shuffle_buffer=4", "data.packing.buffer_size=8",
            f"data.train_shards={shards}", f"data.eval_shards={shards}", f"train.out_dir={out}", "train.steps=6",
            "train.log_every=2", "train.ckpt_every=100", "optim.warmup_steps=1"]
    proc = subprocess.run([sys.executable, "-m", "navit_clip", *args], capture_output=True, text=True, timeout=600,
                          env={**env, "MKL_CBWR": "COMPATIBLE"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    assert last["step"] == 6
    assert last["skipped_samples"] == sum(last["skipped_by_reason"].values()) > 0
    assert set(last["skipped_by_reason"]) <= set(EXPECTED_SKIPS)
    # 20 good samples and 6 steps of ~6 images: the reader has been through every shard
    assert set(last["skipped_by_reason"]) == set(EXPECTED_SKIPS)
    # the stream the run trained on (saved with its checkpoint) is the one `stream_spec` builds
    from dataclasses import asdict

    from navit_clip.config import Config, config_from_dict
    from navit_clip.data.spec import stream_spec
    from navit_clip.train.checkpoint import load_model_state

    _, client = load_model_state(out / "checkpoints")
    expected = asdict(stream_spec(config_from_dict(Config, client["config"])))
    # paths may move (a SentencePiece file goes by hash); training crops that are off are left out,
    # so checkpoints from before they existed still resume
    kept = [k for k in expected if k not in ("shards", "tokenizer", "augment")]
    assert {k: client["data"]["stream"][k] for k in kept} == {k: expected[k] for k in kept}
    assert "augment" not in client["data"]["stream"]


@pytest.mark.parametrize("override, key", [("data.drop.kind=sometimes", "data.drop.kind"),
                                           ("data.drop.rate=1.2", "data.drop.rate"),
                                           ("data.resolution.mode=random", "data.resolution.mode"),
                                           ("data.sources.shard_kind=zip", "data.sources.shard_kind"),
                                           ("data.packing.buffer_size=-1", "data.packing.buffer_size")])
def test_bad_data_config_names_key(override, key):
    from navit_clip.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_config_reaches_the_stream():
    from navit_clip.config import PackingConfig, SourcesConfig, load_config
    from navit_clip.data.resolution import ResolutionPolicy
    from navit_clip.data.spec import stream_spec

    cfg = load_config(None, ["data.drop.kind=beta", "data.drop.beta_a=2", "data.resolution.mode=side_normal",
                             "data.resolution.side_mean=0.3", "data.packing.buffer_size=128",
                             "data.sources.resampled=true", "data.sources.steps_per_epoch=50",
                             "data.sources.weights=0.7,0.3", "model.vision.patch_size=16", "train.seed=3"])
    spec = stream_spec(cfg)
    assert spec.drop == DropPolicy(kind="beta", beta_a=2.0, beta_b=1.0, max_rate=0.5, min_tokens=16, max_tokens=64)
    assert spec.resolution == ResolutionPolicy(patch_size=16, max_tokens=64, max_side=32, mode="side_normal",
                                               min_tokens=16, side_mean=0.3)
    assert spec.packing == PackingConfig(open_sequences=8, buffer_size=128)
    assert spec.sources == SourcesConfig(weights="0.7,0.3", resampled=True, steps_per_epoch=50)
    assert (spec.shards, spec.seq_len, spec.max_images, spec.sequences_per_batch, spec.text_len, spec.seed,
            spec.loop) == (cfg.data.train_shards, 256, 16, 4, 32, 3, True)
    # the spec holds copies: changing the config afterwards does not change a built stream
    cfg.data.sources.weights = "1,1"
    assert spec.sources.weights == "0.7,0.3"


def test_every_resolution_and_drop_key_reaches_its_policy():
    """A knob has one name from YAML to the code: each key of data.resolution and data.drop is a
    field of the policy it configures, and a changed value arrives there unchanged."""
    from dataclasses import fields

    from navit_clip.config import DropConfig, ResolutionConfig, load_config
    from navit_clip.data.spec import stream_spec

    changed = {"resolution": {"mode": "sampled", "max_tokens": 65, "min_tokens": 8, "side_mean": 0.25,
                              "side_std": 0.125, "ramp_start_tokens": 1, "ramp_steps": 1, "square_fit": "squash",
                              "skip_blank_below": 16},
               "drop": {"kind": "constant", "rate": 0.25, "beta_a": 0.5, "beta_b": 0.5, "max_rate": 0.25,
                        "ramp_start": 0.5, "ramp_steps": 1}}
    for section, config_cls in (("resolution", ResolutionConfig), ("drop", DropConfig)):
        assert set(changed[section]) == {f.name for f in fields(config_cls)}  # every key is covered
        for name, value in changed[section].items():
            assert value != getattr(config_cls(), name)
            spec = stream_spec(load_config(None, [f"data.{section}.{name}={value}"]))
            assert getattr(getattr(spec, section), name) == value, f"data.{section}.{name}"
