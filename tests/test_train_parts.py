"""Pieces of the training machinery that need no process group: weight-decay groups, the DeepSpeed
config we hand over, metrics files, RNG state round trips, the FLOP estimate."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from navit_clip.config import Config, ConfigError, load_config
from navit_clip.model.clip import NaViTCLIP
from navit_clip.train.checkpoint import load_rng_state, save_rng_state
from navit_clip.train.engine import decay_split, deepspeed_config, param_checksum, param_groups, tower_sizes
from navit_clip.train.metrics import (JsonlLogger, TensorBoardLogger, model_flops, plot_curves, read_jsonl,
                                      truncate_jsonl)


@pytest.fixture(scope="module")
def model() -> NaViTCLIP:
    cfg = load_config(None, ["model.vision.depth=1", "model.text.depth=1", "model.loss=sigmoid"])
    return NaViTCLIP(cfg.model)


def test_weight_decay_only_on_linear_weight_matrices(model):
    decay, no_decay = decay_split(model)
    assert set(decay).isdisjoint(no_decay)
    assert set(decay) | set(no_decay) == {n for n, _ in model.named_parameters()}
    # decayed: the weight matrices of linear layers, nothing else
    for name in ("image.navit.patch_embed.1.weight", "image.navit.blocks.0.attn.qkv.weight",
                 "image.navit.blocks.0.mlp.2.weight", "image.navit.pool.kv.weight", "image.proj.weight",
                 "text.transformer.blocks.0.attn.out.weight", "text.proj.weight"):
        assert name in decay, name
    # not decayed: embeddings, position tables, norms, biases, the loss temperature and bias, pooling queries
    for name in ("text.transformer.token_emb.weight", "text.transformer.pos_emb", "image.navit.pos_emb.rows",
                 "image.navit.pos_emb.cols", "image.navit.blocks.0.norm1.weight", "image.navit.norm.bias",
                 "image.navit.patch_embed.0.weight", "image.navit.blocks.0.attn.qkv.bias", "logit_scale", "logit_bias",
                 "image.navit.pool.query"):
        assert name in no_decay, name
    assert all(p.ndim >= 2 for n, p in model.named_parameters() if n in decay)
    groups = param_groups(model, 0.1)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert [len(g["params"]) for g in groups] == [len(decay), len(no_decay)]


def test_deepspeed_config_takes_batch_precision_clipping_and_accumulation_from_ours(tmp_path):
    cfg = load_config(None, ["train.grad_accum_steps=4", "train.precision=bf16", "optim.grad_clip=0.5",
                             "data.sequences_per_batch=3"])
    ds = deepspeed_config(cfg)
    assert ds["gradient_accumulation_steps"] == 4 and ds["train_micro_batch_size_per_gpu"] == 3
    assert ds["bf16"] == {"enabled": True} and ds["gradient_clipping"] == 0.5
    for stage in (1, 2, 3):
        cfg.train.deepspeed = f"configs/deepspeed/zero{stage}.json"
        assert deepspeed_config(cfg)["zero_optimization"]["stage"] == stage
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"gradient_accumulation_steps": 2}))
    cfg.train.deepspeed = str(bad)
    with pytest.raises(ConfigError, match="train.grad_accum_steps"):
        deepspeed_config(cfg)
    with pytest.raises(ConfigError, match="train.grad_accum_steps"):
        load_config(None, ["train.grad_accum_steps=0"])


def test_rng_state_round_trip(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    save_rng_state(tmp_path, rank=5)
    expected = (torch.rand(4), np.random.rand(3), random.random())
    torch.manual_seed(7), np.random.seed(7), random.seed(7)
    assert load_rng_state(tmp_path, rank=5)
    got = (torch.rand(4), np.random.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]
    assert not load_rng_state(tmp_path, rank=6)  # no file for that rank: nothing restored, no error


def test_metrics_truncate_tensorboard_and_plot(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = JsonlLogger(path)
    for step in range(1, 7):
        log.log(step=step, loss=3.0 - 0.1 * step, lr=1e-3, logit_scale=10.0, images_per_s=5.0, param_checksums=None)
    assert truncate_jsonl(path, 4) == 2
    assert [r["step"] for r in read_jsonl(path)] == [1, 2, 3, 4]
    assert truncate_jsonl(path, 4) == 0

    board = TensorBoardLogger(tmp_path / "tb")
    for row in read_jsonl(path):
        board.log(row["step"], row)
    board.close()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert {"train/loss", "train/lr", "train/logit_scale", "train/images_per_s"} <= set(events.Tags()["scalars"])
    assert [round(e.value, 5) for e in events.Scalars("train/loss")] == [2.9, 2.8, 2.7, 2.6]

    png = plot_curves(path, tmp_path / "curves.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_curves(tmp_path / "missing.jsonl", tmp_path / "none.png") is None


def test_flops_estimate_and_checksum(model):
    sizes = tower_sizes(model)
    total = sum(p.numel() for p in model.parameters())
    assert sizes["vision"] + sizes["text"] == total - 2  # all but logit_scale and logit_bias
    assert model_flops(sizes, 100, 0) == 6 * sizes["vision"] * 100
    assert model_flops(sizes, 100, 50) == 6 * (sizes["vision"] * 100 + sizes["text"] * 50)
    before = param_checksum(model)
    with torch.no_grad():
        model.text.proj.weight[0, 0] += 1e-3
    assert not torch.equal(before, param_checksum(model))
    with torch.no_grad():
        model.text.proj.weight[0, 0] -= 1e-3


def test_config_knobs_have_defaults():
    cfg = Config()
    assert cfg.train.grad_accum_steps == 1 and cfg.train.peak_tflops == 0.0
