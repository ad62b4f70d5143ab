"""Resume points: what each checkpoint saves besides the weights (step, data-stream position and
identity, random generators), and how a restarted run with the same `train.out_dir` finds the
last complete one, checks that it may continue it, and loads it."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from navit_clip import dist
from navit_clip.config import Config, ConfigError, config_to_dict
from navit_clip.data.spec import StreamSpec
from navit_clip.data.shards import expand_shards
from navit_clip.data.text import CLIP_BPE, TOKENIZER_FILE
from navit_clip.errors import InputError
from navit_clip.train.checkpoint import (latest_tag, load_rng_state, prune_checkpoints, save_model_file,
                                        save_rng_state, step_tag, tag_step, write_latest)
from navit_clip.train.metrics import truncate_jsonl

log = logging.getLogger(__name__)


def find_resume_step(cfg: Config, ckpt_dir: Path) -> int:
    """The step of the last complete checkpoint, or -1 for a fresh run. Rank 0 decides, so that
    ranks never disagree (a node that cannot see train.out_dir then fails to load instead of
    silently starting from step 0)."""
    found = latest_tag(ckpt_dir) if dist.is_main() else None
    if found is not None and tag_step(found) is None:
        raise InputError(f"{ckpt_dir / 'latest'} names {found!r}, which is not a navit-clip step checkpoint")
    found_step = dist.broadcast_int(-1 if found is None else tag_step(found))
    if found_step >= 0 and not cfg.train.resume:
        raise ConfigError(f"train.out_dir {Path(cfg.train.out_dir)} already holds checkpoints (latest: "
                          f"{step_tag(found_step)}); set train.resume=true to continue that run or choose a new "
                          "train.out_dir")
    return found_step


def load_resume_point(engine, ckpt_dir: Path, found_step: int,
                      stream_id: dict[str, Any]) -> tuple[int, dict[str, Any] | None]:
    """Load model, optimizer, schedule and random generators of checkpoint `found_step` (none
    when it is -1) -> (the step to start from, the data-stream state to continue)."""
    if found_step < 0:
        return 0, None
    tag = step_tag(found_step)
    path, client = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:
        raise RuntimeError(f"could not load checkpoint {tag} from {ckpt_dir}")
    start_step, data_state = int(client["step"]), client["data"]
    check_same_stream(data_state.get("stream"), stream_id)
    load_rng_state(ckpt_dir / tag, dist.rank())
    log.info("resumed from %s at step %d", path, start_step)
    return start_step, data_state


def prepare_run_dir(cfg: Config, out_dir: Path, start_step: int) -> None:
    """Rank 0 writes the config and drops the metrics rows of steps after the resume point (the
    steps a killed run logged after its last checkpoint are trained again)."""
    if dist.is_main():
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=2))
        truncate_jsonl(out_dir / "metrics.jsonl", start_step)
        keep_tokenizer(cfg.model.text.tokenizer, out_dir)


def keep_tokenizer(tokenizer: str, out_dir: Path) -> None:
    """Copy a SentencePiece model into the run (TOKENIZER_FILE), so that evaluating and exporting
    the run need not find the original file; a resumed run must keep the same one."""
    if tokenizer == CLIP_BPE:
        return
    source, kept = Path(tokenizer), out_dir / TOKENIZER_FILE
    if kept.exists() and source.resolve() != kept.resolve() and kept.read_bytes() != source.read_bytes():
        raise ConfigError(f"model.text.tokenizer {source} differs from the tokenizer this run was trained with "
                          f"({kept}); resume with that one or start a new train.out_dir")
    if not kept.exists() or source.resolve() != kept.resolve():
        shutil.copyfile(source, kept)


def save_checkpoint(engine, ckpt_dir: Path, step: int, data_state: dict, cfg: Config, stage: int) -> None:
    """Every rank writes its part; only then does `latest` name the new checkpoint."""
    tag = step_tag(step)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, save_latest=False,
                           client_state={"step": step, "data": data_state, "config": config_to_dict(cfg)})
    save_model_file(engine, ckpt_dir / tag, stage)  # a collective under ZeRO-3
    save_rng_state(ckpt_dir / tag, dist.rank())
    dist.barrier()  # every rank's files are written before `latest` may name them
    if dist.is_main():
        write_latest(ckpt_dir, tag)
        prune_checkpoints(ckpt_dir, cfg.train.keep_checkpoints)
    dist.barrier()


def stream_identity(spec: StreamSpec, cfg: Config) -> dict[str, Any]:
    """What determines the data stream, saved with each checkpoint. The shard paths may move;
    their number, the sizes, the packing, seeds, ranks and workers may not."""
    identity = {k: v for k, v in dataclasses.asdict(spec).items() if k not in ("shards", "tokenizer")}
    if spec.tokenizer != CLIP_BPE:  # the file may move; its content may not
        identity["tokenizer_sha256"] = hashlib.sha256(Path(spec.tokenizer).read_bytes()).hexdigest()
    return {**identity, "num_shards": len(expand_shards(spec.shards, spec.sources.allow_pipe)), "world_size": dist.world_size(),
            "num_workers": cfg.data.num_workers}


def check_same_stream(saved: dict[str, Any] | None, current: dict[str, Any]) -> None:
    """Resuming skips the batches already trained on, which is right only for the same stream."""
    if saved is None:
        return
    changed = sorted(k for k in saved.keys() | current.keys() if saved.get(k) != current.get(k))
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in changed)
        raise ConfigError(f"cannot resume: the data stream differs from the checkpoint's ({details}); "
                          "resume with the same data settings, ranks and workers, or start a new train.out_dir")
