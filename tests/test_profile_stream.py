"""tools/profile_stream.py: the training stream's CPU time per batch and its profile."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[1] / "tools" / "profile_stream.py"


def load_tool():
    spec = importlib.util.spec_from_file_location("profile_stream", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_profiles_the_training_stream_of_a_config(tiny_shards):
    tool = load_tool()
    overrides = [f"data.train_shards={tiny_shards.spec}", "model.vision.patch_size=16", "data.seq_len=64",
                 "data.max_images=5", "data.sequences_per_batch=2", "data.resolution.max_tokens=24",
                 "data.resolution.min_tokens=4", "data.num_workers=0"]
    per_batch, stats = tool.profile_stream("configs/default.yaml", overrides, batches=3)
    assert 0 < per_batch < 5
    functions = {name for (_, _, name) in stats.stats}
    assert {"patch_image", "decode_sample"} <= functions  # the stream's own work was profiled
    with pytest.raises(SystemExit, match="--batches"):
        tool.profile_stream("configs/default.yaml", overrides, batches=0)
