"""The training loop: a DeepSpeed engine over NaViTCLIP, fed by the packed stream.

Every `train.ckpt_every` steps (and at the end) it writes a DeepSpeed checkpoint holding the
model, optimizer, LR schedule, step and data-stream position; a restarted run with the same
`train.out_dir` continues from the last complete one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from navit_clip import dist
from navit_clip.config import Config, ConfigError, config_to_dict
from navit_clip.data.loader import ResumableBatches, make_loader
from navit_clip.data.shards import SKIP_REASONS, expand_shards, skip_counts
from navit_clip.data.spec import StreamSpec, stream_spec
from navit_clip.loss import contrastive_loss
from navit_clip.train.checkpoint import (latest_tag, load_rng_state, prune_checkpoints, save_model_file,
                                        save_rng_state, step_tag, tag_step, write_latest)
from navit_clip.train.engine import (OWNED_DEEPSPEED_KEYS, build_engine, deepspeed_config,  # noqa: F401 - re-exported
                                     param_checksum, param_groups, tower_sizes)
from navit_clip.train.metrics import JsonlLogger, TensorBoardLogger, model_flops, plot_curves, truncate_jsonl

log = logging.getLogger(__name__)

# Fault injection for tests: "STEP:RANK" makes the loss of that (1-based) step NaN on that rank.
FAULT_ENV = "NAVIT_CLIP_FAULT_NONFINITE"
# A run whose loss stays non-finite this many steps (or micro-batches) in a row is broken, not unlucky.
MAX_NONFINITE_IN_A_ROW = 20


@dataclass
class StepStats:
    """One optimizer step, summed over its micro-batches and all ranks."""

    losses: list[float] = dataclasses.field(default_factory=list)
    images: int = 0
    skipped_samples: int = 0
    skipped_by_reason: dict[str, int] = dataclasses.field(default_factory=dict)
    padded_tokens: int = 0
    tokens: int = 0
    text_tokens: int = 0
    nonfinite: int = 0
    applied: bool = False
    stop: bool = False
    logit_scale: float = math.nan

    @property
    def loss(self) -> float:
        return sum(self.losses) / len(self.losses) if self.losses else math.nan


def fault_step(rank: int) -> int | None:
    spec = os.environ.get(FAULT_ENV, "")
    if not spec:
        return None
    step, fault_rank = (int(x) for x in spec.split(":"))
    return step if fault_rank == rank else None


def train_step(engine, batches: ResumableBatches, cfg: Config, stop: "StopRequest", step: int,
               poison_step: int | None) -> StepStats:
    """Forward, backward and optimizer step over train.grad_accum_steps micro-batches.

    NaN/Inf guard: the loss's finiteness travels in the per-micro-batch all-reduce, so every rank
    drops a non-finite micro-batch before its backward, together. Without accumulation the step is
    skipped (weights, optimizer state and LR schedule unchanged); with it, the next micro-batch
    takes the dropped one's place so that DeepSpeed's accumulation boundary stays in step."""
    gas, stats, bad_in_row = cfg.train.grad_accum_steps, StepStats(), 0
    device = engine.device
    while len(stats.losses) < gas:
        batch = next(batches)
        out = engine(batch.to(device))
        # the loss computes in fp32 whatever the towers' dtype, and returns gradients in that dtype
        loss = contrastive_loss(out["image"], out["text"], out["valid"], out["logit_scale"], out.get("logit_bias"),
                                kind=cfg.model.loss, chunk_size=cfg.model.loss_chunk_size,
                                max_logit_scale=math.exp(cfg.model.max_logit_scale))
        if poison_step == step + 1 and not stats.nonfinite:
            loss = loss * math.nan
        slots = batch.num_sequences * batch.seq_len
        counts = torch.tensor([batch.num_images, batch.skipped_samples, int((batch.segment < 0).sum()), slots,
                               batch.num_images * batch.text.shape[-1], float(stop.requested),
                               float(not torch.isfinite(loss)), *skip_counts(batch.skipped_by_reason)],
                              dtype=torch.float64, device=device)  # nccl: on the GPU
        images, skipped, padded, tokens, text_tokens, stopping, bad, *reasons = dist.all_reduce_sum(counts).tolist()
        for reason, n in zip(SKIP_REASONS, reasons):
            if n:
                stats.skipped_by_reason[reason] = stats.skipped_by_reason.get(reason, 0) + int(n)
        stats.images += int(images)
        stats.skipped_samples += int(skipped)
        stats.padded_tokens += int(padded)
        stats.tokens += int(tokens)
        stats.text_tokens += int(text_tokens)
        stats.stop = stats.stop or bool(stopping)
        stats.logit_scale = out["logit_scale"].item()
        if bad:
            stats.nonfinite += 1
            log.warning("non-finite loss at step %d on %d rank(s): batch dropped on every rank%s", step + 1, int(bad),
                        "" if gas > 1 else ", optimizer step skipped")
            if gas == 1:
                return stats
            bad_in_row += 1
            if bad_in_row >= MAX_NONFINITE_IN_A_ROW:
                raise FloatingPointError(f"{bad_in_row} non-finite micro-batches in a row at step {step + 1}; "
                                         "lower optim.lr or check the data")
            continue
        bad_in_row = 0
        engine.backward(loss)
        engine.step()
        stats.losses.append(loss.item())
    stats.applied = True
    return stats


def train(cfg: Config) -> dict[str, Any]:
    """Train for cfg.train.steps steps (resuming if a checkpoint exists); return a summary."""
    dist.init_distributed()
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    out_dir = Path(cfg.train.out_dir)
    ckpt_dir = out_dir / "checkpoints"
    engine, _, scheduler = build_engine(cfg)
    stage = engine.zero_optimization_stage()

    # Rank 0 decides whether and where to resume, so that ranks never disagree (a node that
    # cannot see train.out_dir then fails to load instead of silently starting from step 0).
    found = latest_tag(ckpt_dir) if dist.is_main() else None
    if found is not None and tag_step(found) is None:
        raise ValueError(f"{ckpt_dir / 'latest'} names {found!r}, which is not a navit-clip step checkpoint")
    found_step = dist.broadcast_int(-1 if found is None else tag_step(found))
    if found_step >= 0 and not cfg.train.resume:
        raise ConfigError(f"train.out_dir {out_dir} already holds checkpoints (latest: {step_tag(found_step)}); "
                          "set train.resume=true to continue that run or choose a new train.out_dir")
    start_step, data_state = 0, None
    spec = stream_spec(cfg)
    stream_id = stream_identity(spec, cfg)
    if found_step >= 0:
        path, client = engine.load_checkpoint(str(ckpt_dir), tag=step_tag(found_step))
        if path is None:
            raise RuntimeError(f"could not load checkpoint {step_tag(found_step)} from {ckpt_dir}")
        start_step, data_state = int(client["step"]), client["data"]
        check_same_stream(data_state.get("stream"), stream_id)
        load_rng_state(ckpt_dir / step_tag(found_step), dist.rank())
        log.info("resumed from %s at step %d", path, start_step)
    if dist.is_main():
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=2))
        truncate_jsonl(out_dir / "metrics.jsonl", start_step)
    metrics = JsonlLogger(out_dir / "metrics.jsonl", enabled=dist.is_main())
    board = TensorBoardLogger(out_dir / "tensorboard", enabled=dist.is_main())
    sizes = tower_sizes(engine.module)
    poison_step = fault_step(dist.rank())

    batches = ResumableBatches(make_loader(spec, rank=dist.rank(), world=dist.world_size(),
                                           num_workers=cfg.data.num_workers), data_state)
    progress = tqdm(range(start_step, cfg.train.steps), initial=start_step, total=cfg.train.steps,
                    disable=not dist.is_main(), desc="train", dynamic_ncols=True)
    loss_value, seen_images, skipped, nonfinite, nonfinite_in_row = math.nan, 0, 0, 0, 0
    skipped_by_reason: dict[str, int] = {}
    window = {"images": 0, "tokens": 0, "flops": 0.0}
    stop = StopRequest()
    done, stopping, last_logged, tick = start_step, False, start_step, time.perf_counter()
    try:
        for step in progress:
            stats = train_step(engine, batches, cfg, stop, step, poison_step)
            stopping, done = stats.stop, step + 1
            seen_images += stats.images
            skipped += stats.skipped_samples
            for reason, n in stats.skipped_by_reason.items():
                skipped_by_reason[reason] = skipped_by_reason.get(reason, 0) + n
            nonfinite += stats.nonfinite
            nonfinite_in_row = 0 if stats.applied else nonfinite_in_row + 1
            if nonfinite_in_row >= MAX_NONFINITE_IN_A_ROW:
                raise FloatingPointError(f"the loss was non-finite {nonfinite_in_row} steps in a row "
                                         f"(last: step {done}); lower optim.lr or check the data")
            if stats.applied:
                loss_value = stats.loss
            real_tokens = stats.tokens - stats.padded_tokens
            window["images"] += stats.images
            window["tokens"] += real_tokens
            window["flops"] += model_flops(sizes, real_tokens, stats.text_tokens)
            if done % cfg.train.log_every == 0 or done == cfg.train.steps or stopping:
                checksums = param_checksums(engine.module, stage)
                elapsed, tick = time.perf_counter() - tick, time.perf_counter()
                row = dict(step=done, world_size=dist.world_size(), loss=stats.loss if stats.applied else None,
                           lr=scheduler.get_last_lr()[0], logit_scale=stats.logit_scale, images_per_step=stats.images,
                           padding=stats.padded_tokens / max(1, stats.tokens), skipped_samples=skipped,
                           skipped_by_reason=dict(skipped_by_reason),
                           nonfinite_skipped=nonfinite, sec_per_step=elapsed / (done - last_logged),
                           images_per_s=window["images"] / elapsed, tokens_per_s=window["tokens"] / elapsed)
                if cfg.train.peak_tflops > 0:
                    row["mfu"] = window["flops"] / (elapsed * dist.world_size() * cfg.train.peak_tflops * 1e12)
                metrics.log(**row, param_checksums=checksums)
                board.log(done, row)
                window = {"images": 0, "tokens": 0, "flops": 0.0}
                last_logged = done
                progress.set_postfix(loss=f"{stats.loss:.3f}", imgs=stats.images, scale=f"{stats.logit_scale:.1f}")
            if done % cfg.train.ckpt_every == 0 or done == cfg.train.steps or stopping:
                saving = time.perf_counter()
                save_checkpoint(engine, ckpt_dir, done, {**batches.state_dict(), "stream": stream_id}, cfg, stage)
                if dist.is_main():
                    plot_curves(out_dir / "metrics.jsonl", out_dir / "curves.png")
                tick += time.perf_counter() - saving  # throughput counts training, not saving
            if stopping:
                log.warning("stop requested (SIGTERM/SIGINT): saved step %d to %s, exiting", done, ckpt_dir)
                break
    finally:
        batches.close()
    progress.close()
    board.close()
    stop.restore()
    return {"steps": done if stopping else cfg.train.steps, "stopped_early": bool(stopping),
            "resumed_from": start_step, "final_loss": loss_value,
            "images_seen": seen_images, "skipped_samples": skipped, "nonfinite_skipped": nonfinite,
            "out_dir": str(out_dir), "checkpoint": str(ckpt_dir / (latest_tag(ckpt_dir) or ""))}


def param_checksums(module: torch.nn.Module, stage: int) -> list[list[float]] | None:
    """Every rank's parameter checksum (rank order), for checking that the replicas agree; None
    under ZeRO-3, where no rank holds the whole model."""
    if stage == 3:
        return None
    local = param_checksum(module).unsqueeze(0)
    return dist.all_gather_no_grad(local).tolist()


class StopRequest:
    """SIGTERM (a preempted job) or SIGINT asks the loop to checkpoint the current step and stop.
    The flag travels in the per-step all-reduce, so every rank saves and stops at the same step."""

    def __init__(self) -> None:
        self.requested = False
        self._received: set[int] = set()
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame) -> None:  # noqa: ANN001 - signal handler signature
        # The same signal twice (Ctrl-C twice) means "now". A launcher that forwards Ctrl-C as
        # SIGTERM delivers two different signals, which must not abort a rank mid-collective.
        if signum in self._received:
            raise KeyboardInterrupt
        self._received.add(signum)
        self.requested = True

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def save_checkpoint(engine, ckpt_dir: Path, step: int, data_state: dict, cfg: Config, stage: int) -> None:
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
    identity = {k: v for k, v in dataclasses.asdict(spec).items() if k != "shards"}
    return {**identity, "num_shards": len(expand_shards(spec.shards, spec.sources.allow_pipe)),
            "world_size": dist.world_size(), "num_workers": cfg.data.num_workers}


def check_same_stream(saved: dict[str, Any] | None, current: dict[str, Any]) -> None:
    """Resuming skips the batches already trained on, which is right only for the same stream."""
    if saved is None:
        return
    changed = sorted(k for k in saved.keys() | current.keys() if saved.get(k) != current.get(k))
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in changed)
        raise ConfigError(f"cannot resume: the data stream differs from the checkpoint's ({details}); "
                          "resume with the same data settings, ranks and workers, or start a new train.out_dir")
