"""The training loop: a DeepSpeed engine over NaViTCLIP, fed by the packed stream.

Every `train.ckpt_every` steps (and at the end) it writes a DeepSpeed checkpoint holding the
model, optimizer, LR schedule, step and data-stream position; a restarted run with the same
`train.out_dir` continues from the last complete one (train/save.py writes them, train/resume.py
finds and loads them). One step, its non-finite guard and its counts live in train/step.py; the
metrics rows here.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from navit_clip import dist
from navit_clip.config import Config
from navit_clip.data.loader import ResumableBatches, make_loader
from navit_clip.data.spec import stream_spec
from navit_clip.train.checkpoint import latest_tag
from navit_clip.train.data_failure import agreed
from navit_clip.train.elastic import checkpoint_stream_state, resumed_stream_state
from navit_clip.train.engine import build_engine, param_checksum, tower_sizes, zero_stage
from navit_clip.train.metrics import JsonlLogger, TensorBoardLogger, model_flops, plot_curves
from navit_clip.train.resume import find_resume_step, load_resume_point, prepare_run_dir, stream_identity
from navit_clip.train.run_lock import hold_run_dir
from navit_clip.train.save import save_checkpoint
from navit_clip.train.schedule import continue_schedule
from navit_clip.train.step import Counts, StepStats, fault_step, train_step
from navit_clip.train.universal import resume_through_universal

log = logging.getLogger(__name__)


def train(cfg: Config, resume_tag: str | None = None) -> dict[str, Any]:
    """Train for cfg.train.steps steps (resuming from checkpoint `resume_tag`, else from the last
    complete one if any); return a summary. The run holds train.out_dir from before anything is
    built until it ends (train/run_lock.py)."""
    dist.init_distributed()
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    with hold_run_dir(cfg.train.out_dir):
        return _train_holding_run_dir(cfg, resume_tag)


def _train_holding_run_dir(cfg: Config, resume_tag: str | None) -> dict[str, Any]:
    out_dir = Path(cfg.train.out_dir)
    ckpt_dir = out_dir / "checkpoints"
    found_step = find_resume_step(cfg, ckpt_dir, resume_tag)  # before the engine: a refusal costs no model build
    universal = resume_through_universal(ckpt_dir, found_step, zero_stage(cfg))  # ZeRO >= 1 on a new world size
    engine, _, scheduler = build_engine(cfg, load_universal=universal)
    spec = stream_spec(cfg)
    stream_id = stream_identity(spec, cfg)
    start_step, data_state = load_resume_point(engine, ckpt_dir, found_step, stream_id)
    train_flops = (data_state or {}).get("train_flops", 0.0)
    data_state, elastic = resumed_stream_state(data_state, spec, cfg.data.num_workers)
    if elastic is not None and engine.zero_optimization_stage() < 3:  # the weights every new rank loaded
        elastic["loaded_param_checksum"] = param_checksum(engine.module).tolist()
    continue_schedule(scheduler, start_step, cfg.train.steps)  # a new train.steps (train.extend)
    prepare_run_dir(cfg, out_dir, start_step)
    rows = MetricsRows(cfg, out_dir, engine, scheduler, start_step, train_flops, elastic)
    poison_step = fault_step(dist.rank())
    batches = agreed(lambda: ResumableBatches(make_loader(spec, rank=dist.rank(), world=dist.world_size(),
                                                          num_workers=cfg.data.num_workers), data_state),
                     discard=ResumableBatches.close)
    progress = tqdm(range(start_step, cfg.train.steps), initial=start_step, total=cfg.train.steps,
                    disable=not dist.is_main(), desc="train", dynamic_ncols=True)
    totals, final_loss, stop = Counts(), math.nan, StopRequest()
    done, stopping = start_step, False
    try:
        for step in progress:
            stats = train_step(engine, batches, cfg, stop, step, poison_step)
            stopping, done = stats.stop, step + 1
            totals.add(stats)
            totals.streak(not stats.applied, "steps", done)
            if stats.applied:
                final_loss = stats.loss
            rows.count(stats)
            if done % cfg.train.log_every == 0 or done == cfg.train.steps or stopping:
                rows.write(done, stats, totals)
                progress.set_postfix(loss=f"{stats.loss:.3f}", imgs=stats.images, scale=f"{stats.logit_scale:.1f}")
            if done % cfg.train.ckpt_every == 0 or done == cfg.train.steps or stopping:
                saving = time.perf_counter()
                save_checkpoint(engine, ckpt_dir, done, {**checkpoint_stream_state(batches, stream_id, elastic),
                                                         "train_flops": rows.train_flops}, cfg, rows.stage)
                if dist.is_main():
                    plot_curves(out_dir / "metrics.jsonl", out_dir / "curves.png")
                rows.exclude(time.perf_counter() - saving)  # throughput counts training, not saving
            if stopping:
                log.warning("stop requested (SIGTERM/SIGINT): saved step %d to %s, exiting", done, ckpt_dir)
                break
    finally:
        batches.close()
    progress.close()
    rows.close()
    stop.restore()
    return {"steps": done if stopping else cfg.train.steps, "stopped_early": bool(stopping),
            "resumed_from": start_step, "elastic_resume": elastic, "final_loss": final_loss,
            "images_seen": totals.images, "skipped_samples": totals.skipped_samples,
            "truncated_captions": totals.truncated_captions,
            "nonfinite_skipped": totals.nonfinite, "flops": rows.train_flops,
            "out_dir": str(out_dir), "checkpoint": str(ckpt_dir / (latest_tag(ckpt_dir) or ""))}


class MetricsRows:
    """The row written every train.log_every steps (and at the end or a stop) to metrics.jsonl and
    TensorBoard: this step's numbers, the run's totals (`flops` since the run began, carried over
    a resume in the checkpoint), and throughput since the previous row."""

    def __init__(self, cfg: Config, out_dir: Path, engine, scheduler, start_step: int, train_flops: float,
                 elastic: dict[str, Any] | None = None) -> None:
        self.cfg, self.engine, self.scheduler = cfg, engine, scheduler
        self.elastic = elastic  # an elastic resume's accounting, written into the first row
        self.stage = engine.zero_optimization_stage()
        self.jsonl = JsonlLogger(out_dir / "metrics.jsonl", enabled=dist.is_main())
        self.board = TensorBoardLogger(out_dir / "tensorboard", enabled=dist.is_main())
        self.sizes = tower_sizes(engine.module)
        self.last_logged, self.tick = start_step, time.perf_counter()
        self.images, self.tokens, self.mfu_flops = 0, 0, 0.0
        self.train_flops = float(train_flops)

    def count(self, stats: StepStats) -> None:
        """Add a step to the throughput window (real tokens: padding does not count)."""
        real_tokens = stats.tokens - stats.padded_tokens
        self.images += stats.images
        self.tokens += real_tokens
        self.mfu_flops += model_flops(self.sizes, real_tokens, stats.text_tokens)
        self.train_flops += stats.flops

    def exclude(self, seconds: float) -> None:
        """Leave time spent outside training (saving a checkpoint) out of the throughput."""
        self.tick += seconds

    def write(self, done: int, stats: StepStats, totals: Counts) -> dict[str, Any]:
        checksums = param_checksums(self.engine.module, self.stage)  # a collective: every rank calls it
        elapsed, self.tick = time.perf_counter() - self.tick, time.perf_counter()
        world = dist.world_size()
        row = dict(step=done, world_size=world, loss=stats.loss if stats.applied else None,
                   lr=self.scheduler.get_last_lr()[0], logit_scale=stats.logit_scale, images_per_step=stats.images,
                   padding=stats.padded_tokens / max(1, stats.tokens), skipped_samples=totals.skipped_samples,
                   skipped_by_reason=dict(totals.skipped_by_reason), truncated_captions=totals.truncated_captions,
                   nonfinite_skipped=totals.nonfinite, sec_per_step=elapsed / (done - self.last_logged),
                   images_per_s=self.images / elapsed, tokens_per_s=self.tokens / elapsed, flops=self.train_flops)
        if self.cfg.train.peak_tflops > 0:
            row["mfu"] = self.mfu_flops / (elapsed * world * self.cfg.train.peak_tflops * 1e12)
        if self.elastic is not None:
            row["elastic_resume"], self.elastic = self.elastic, None
        if torch.cuda.is_available():  # this rank's high-water mark of tensor memory so far
            row["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        self.jsonl.log(**row, param_checksums=checksums)
        self.board.log(done, row)
        self.images, self.tokens, self.mfu_flops = 0, 0, 0.0
        self.last_logged = done
        return row

    def close(self) -> None:
        self.board.close()


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
