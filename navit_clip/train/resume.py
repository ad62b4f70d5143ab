"""Resume points: what each checkpoint saves besides the weights (step, data-stream position and
identity, random generators), and how a restarted run with the same `train.out_dir` finds the
last complete one (its files match their manifests) or the one `--resume stepN` names, checks
that it may continue it (the same model, LR schedule and data stream), and loads it."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from navit_clip import dist
from navit_clip.config import Config, ConfigError, config_from_dict, config_to_dict
from navit_clip.data.spec import StreamSpec
from navit_clip.data.shards import expand_shards
from navit_clip.data.text import CLIP_BPE, TOKENIZER_FILE
from navit_clip.errors import CheckpointError, UserError
from navit_clip.train.checkpoint import latest_tag, load_rng_state, step_tag, tag_step
from navit_clip.train.elastic import LAYOUT_KEYS
from navit_clip.train.manifest import checkpoint_problem, has_manifest
from navit_clip.train.save import CONFIG_FILE
from navit_clip.train.schedule import restore_horizon
from navit_clip.train.metrics import truncate_jsonl
from navit_clip.train.universal import UNIVERSAL_DIR, weights_only_loads

log = logging.getLogger(__name__)


#: model keys that decide how the model is computed or initialised, not which weights it has and
#: what it learns: these may change when a run resumes (a preset is resolved into the sizes, which
#: are compared)
RESUMABLE_MODEL_KEYS = frozenset({
    "model.vision.attention", "model.vision.grad_checkpointing", "model.vision.compile", "model.vision.preset",
    "model.text.grad_checkpointing", "model.loss_chunk_size", "model.init_logit_scale", "model.init_logit_bias",
})

#: keys besides train.steps that define the LR schedule (train/schedule.py)
SCHEDULE_KEYS = ("optim.lr", "optim.warmup_steps", "optim.min_lr_ratio")


def find_resume_step(cfg: Config, ckpt_dir: Path, tag: str | None = None) -> int:
    """The step of the checkpoint named by `tag`, else of the last complete one, or -1 for a fresh run. Rank 0 decides and every
    rank takes its decision, or raises its error, so that ranks never disagree (a node that cannot
    see train.out_dir then fails to load instead of silently starting from step 0)."""
    decision: int | UserError = -1
    if dist.is_main():
        try:
            decision = choose_resume_step(cfg, ckpt_dir, tag)
        except UserError as exc:
            decision = exc
    decision = dist.broadcast_object(decision)
    if isinstance(decision, UserError):
        raise decision
    return decision


def choose_resume_step(cfg: Config, ckpt_dir: Path, tag: str | None = None) -> int:
    """Rank 0's decision: the checkpoint named by `tag` (`--resume stepN`), else -1 without
    checkpoints, else the newest complete one. Its model and LR schedule must be the configured
    ones."""
    if tag is not None:
        tag = named_checkpoint(ckpt_dir, tag)
    else:
        latest = latest_tag(ckpt_dir)
        if latest is None:
            return -1
        if tag_step(latest) is None:
            raise CheckpointError(f"{ckpt_dir / 'latest'} names {latest!r}, which is not a navit-clip step checkpoint; "
                                  "write the name of a complete checkpoint directory (stepN) into it")
        if not cfg.train.resume:
            raise ConfigError(f"train.out_dir {Path(cfg.train.out_dir)} already holds checkpoints (latest: {latest}); "
                              "set train.resume=true to continue that run or choose a new train.out_dir")
        tag = complete_checkpoint(ckpt_dir, latest)
    saved = saved_config(ckpt_dir / tag)
    if saved is not None:
        check_same_model(cfg, *saved)
        check_same_schedule(cfg, tag_step(tag), *saved)
    return tag_step(tag)


def step_tags(ckpt_dir: Path) -> list[str]:
    """The step checkpoint directories in ckpt_dir, oldest first."""
    return sorted((p.name for p in ckpt_dir.glob("step*") if p.is_dir() and tag_step(p.name) is not None),
                  key=tag_step)


def named_checkpoint(ckpt_dir: Path, tag: str) -> str:
    """`--resume stepN`: that checkpoint, which must exist and whose files must match their
    manifests; else an error that lists the complete checkpoints there are."""
    tag_dir = ckpt_dir / tag
    problem = ("--resume takes latest, never or a checkpoint name stepN" if tag_step(tag) is None else
               f"{tag_dir} does not exist" if not tag_dir.is_dir() else
               checkpoint_problem(tag_dir) if has_manifest(tag_dir) else None)
    if problem is None:
        return tag
    complete = [t for t in step_tags(ckpt_dir) if not has_manifest(ckpt_dir / t) or checkpoint_problem(ckpt_dir / t) is None]
    raise CheckpointError(f"cannot resume from {tag}: {problem}; complete checkpoints in {ckpt_dir}: "
                          f"{', '.join(complete) or 'none'}")


def complete_checkpoint(ckpt_dir: Path, latest: str) -> str:
    """The newest checkpoint, from the one `latest` names down, whose files all match their
    manifests; a damaged one is skipped with a warning that names the file. One written before
    checkpoints had manifests is taken as it is."""
    if not has_manifest(ckpt_dir / latest):
        log.info("checkpoint %s has no manifest (written by an earlier version): not verified", latest)
        return latest
    older = [t for t in reversed(step_tags(ckpt_dir)) if tag_step(t) < tag_step(latest)]
    problems = []
    for tag in (latest, *older):
        problem = checkpoint_problem(ckpt_dir / tag)
        if problem is None:
            if problems:
                log.warning("skipping damaged checkpoints (%s); resuming from step %d, the previous complete "
                            "checkpoint", "; ".join(problems), tag_step(tag))
            return tag
        problems.append(f"step {tag_step(tag)}: {problem}")
    raise CheckpointError(f"no complete checkpoint left in {ckpt_dir} ({'; '.join(problems)}); restore those files, "
                          "or start over with a new train.out_dir")


def saved_config(tag_dir: Path) -> tuple[dict[str, Any], Path] | None:
    """(the flat config a checkpoint was written with, its file), or None for a checkpoint that
    has none. Keys moved since it was written are at their new paths."""
    saved_path = tag_dir / CONFIG_FILE
    if not saved_path.exists():  # written before checkpoints held their config: the run's last one
        saved_path = tag_dir.parent.parent / CONFIG_FILE
    if not saved_path.exists():
        return None
    saved = json.loads(saved_path.read_text())
    try:
        saved = config_to_dict(config_from_dict(Config, saved))
    except ConfigError:
        pass  # a key this version does not know: compare the sections as they were saved
    return _flat(saved, ""), saved_path


def check_same_model(cfg: Config, saved: dict[str, Any], saved_path: Path) -> None:
    """Refuse, before any weights are loaded, model settings that differ from the checkpoint's:
    its weights would not fit, or it would learn something else. Naming the keys beats
    DeepSpeed's state-dict mismatch dump."""
    saved = {k: v for k, v in saved.items() if k.startswith("model.")}
    current = _flat(config_to_dict(cfg)["model"], "model")
    changed = sorted(k for k in saved.keys() | current.keys()
                     if k not in RESUMABLE_MODEL_KEYS and saved.get(k) != current.get(k))
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in changed)
        raise ConfigError(f"cannot resume: the model differs from the checkpoint's {saved_path} ({details}); resume "
                          "with the checkpoint's model settings, or start a new train.out_dir")


def check_same_schedule(cfg: Config, step: int, saved: dict[str, Any], saved_path: Path) -> None:
    """Refuse an LR schedule other than the checkpoint's: the optimizer and scheduler state it
    holds follow its settings, so a change would be ignored or make the LR jump. A different
    train.steps is allowed by train.extend (the loop then continues the schedule to the new end)."""
    current = _flat(config_to_dict(cfg), "")
    changed = [k for k in SCHEDULE_KEYS if k in saved and saved[k] != current[k]]
    if changed:
        details = ", ".join(f"{k}: {saved[k]!r} -> {current[k]!r}" for k in changed)
        raise ConfigError(f"cannot resume: the LR schedule differs from the checkpoint's {saved_path} ({details}); "
                          "resume with the checkpoint's optim settings, or start a new train.out_dir")
    before, now = saved.get("train.steps", cfg.train.steps), cfg.train.steps
    if now == before:
        return
    if now <= step:
        raise ConfigError(f"cannot resume: train.steps={now} is not past step {step} of the checkpoint "
                          f"(trained toward train.steps={before}); choose a larger train.steps or an earlier checkpoint")
    if not cfg.train.extend:
        raise ConfigError(f"cannot resume with train.steps={now}: the checkpoint at step {step} was trained toward "
                          f"train.steps={before}, which sets the LR decay; set train.extend=true to continue the "
                          f"decay to the new end, or resume with train.steps={before}")


def _flat(values: dict[str, Any], prefix: str) -> dict[str, Any]:
    flat = {}
    for key, value in values.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            flat.update(_flat(value, name))
        else:
            flat[name] = value
    return flat


def load_resume_point(engine, ckpt_dir: Path, found_step: int,
                      stream_id: dict[str, Any]) -> tuple[int, dict[str, Any] | None]:
    """Load model, optimizer, schedule and random generators of checkpoint `found_step` (none
    when it is -1) -> (the step to start from, the data-stream state to continue)."""
    if found_step < 0:
        return 0, None
    tag = step_tag(found_step)
    if engine.load_universal_checkpoint():  # ZeRO >= 1 on a new world size: its converted copy
        with weights_only_loads():
            path, client = engine.load_checkpoint(str(ckpt_dir / tag), tag=UNIVERSAL_DIR)
    else:
        path, client = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:
        raise RuntimeError(f"could not load checkpoint {tag} from {ckpt_dir}")
    start_step, data_state = int(client["step"]), client["data"]
    restore_horizon(engine.lr_scheduler, client.get("config"))  # loop.py continues it to a new train.steps
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


def stream_identity(spec: StreamSpec, cfg: Config) -> dict[str, Any]:
    """What determines the data stream, saved with each checkpoint. The shard paths may move;
    their number, the sizes, the packing and seeds may not; ranks and workers are recorded for an
    elastic resume."""
    identity = {k: v for k, v in dataclasses.asdict(spec).items() if k not in ("shards", "tokenizer")}
    if not spec.augment.active:  # checkpoints from before training crops existed stay resumable
        identity.pop("augment")
    if spec.tokenizer != CLIP_BPE:  # the file may move; its content may not
        identity["tokenizer_sha256"] = hashlib.sha256(Path(spec.tokenizer).read_bytes()).hexdigest()
    return {**identity, "num_shards": len(expand_shards(spec.shards, spec.sources.allow_pipe)), "world_size": dist.world_size(),
            "num_workers": cfg.data.num_workers}


def check_same_stream(saved: dict[str, Any] | None, current: dict[str, Any]) -> None:
    """Resuming continues the data stream, which is right only for the same stream; the number of
    ranks and workers may change (train/elastic.py)."""
    if saved is None:
        return
    changed = sorted(k for k in saved.keys() | current.keys() if k not in LAYOUT_KEYS and saved.get(k) != current.get(k))
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in changed)
        raise ConfigError(f"cannot resume: the data stream differs from the checkpoint's ({details}); "
                          "resume with the same data settings, or start a new train.out_dir")
