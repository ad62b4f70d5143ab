"""DeepSpeed checkpoints that load with `weights_only=True`, and pruning of old ones.

DeepSpeed writes the `latest` tag file only after every rank has finished writing, so a run
that crashed mid-save resumes from the previous, complete checkpoint.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine


class SafeCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine, but loading refuses to unpickle arbitrary objects."""

    def load(self, path: str, map_location=None):  # noqa: ANN001 - DeepSpeed's signature
        return torch.load(path, map_location=map_location, weights_only=True)


def latest_tag(ckpt_dir: str | Path) -> str | None:
    """The tag of the last complete checkpoint in ckpt_dir, or None."""
    latest = Path(ckpt_dir) / "latest"
    if not latest.exists():
        return None
    tag = latest.read_text().strip()
    if not (Path(ckpt_dir) / tag).is_dir():
        raise FileNotFoundError(f"{latest} names checkpoint {tag!r}, which is missing from {ckpt_dir}")
    return tag


def prune_checkpoints(ckpt_dir: str | Path, keep: int) -> list[str]:
    """Delete all but the `keep` newest step-tagged checkpoints, never the one `latest` names."""
    ckpt_dir = Path(ckpt_dir)
    current = latest_tag(ckpt_dir)
    tags = sorted((p for p in ckpt_dir.glob("step*") if p.is_dir() and p.name[4:].isdigit()),
                  key=lambda p: int(p.name[4:]))
    removed = []
    for path in tags[:-keep] if keep > 0 else tags:
        if path.name != current:
            shutil.rmtree(path)
            removed.append(path.name)
    return removed
