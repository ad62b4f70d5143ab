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
import signal
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from navit_clip import dist
from navit_clip.config import Config, ConfigError, config_to_dict, resolve_path
from navit_clip.data.loader import ResumableBatches, StreamSpec, extra_stream_fields, make_loader
from navit_clip.data.shards import SKIP_REASONS, expand_shards, skip_counts
from navit_clip.loss import contrastive_loss
from navit_clip.model.clip import NaViTCLIP
from navit_clip.train.checkpoint import (SafeCheckpointEngine, latest_tag, prune_checkpoints, step_tag, tag_step,
                                        write_latest)
from navit_clip.train.metrics import JsonlLogger
from navit_clip.train.schedule import warmup_cosine

log = logging.getLogger(__name__)

# Batch geometry and precision come from our config; a DeepSpeed JSON that sets them is refused
# rather than silently disagreeing with it.
OWNED_DEEPSPEED_KEYS = {
    "train_batch_size": "data.sequences_per_batch",
    "train_micro_batch_size_per_gpu": "data.sequences_per_batch",
    "gradient_accumulation_steps": "data.sequences_per_batch",
    "gradient_clipping": "optim.grad_clip",
    "bf16": "train.precision",
    "fp16": "train.precision",
    "optimizer": "optim.*",
    "scheduler": "optim.*",
}


def train_stream_spec(cfg: Config) -> StreamSpec:
    d, v = cfg.data, cfg.model.vision
    return StreamSpec(shards=d.train_shards, patch_size=v.patch_size, max_side=v.max_grid_side,
                      text_len=cfg.model.text.context_length, seq_len=d.seq_len, max_images=d.max_images,
                      sequences_per_batch=d.sequences_per_batch, max_tokens=d.max_tokens_per_image,
                      min_tokens=d.min_tokens_per_image, resolution=d.resolution, open_sequences=d.open_sequences,
                      shuffle_buffer=d.shuffle_buffer, loop=True, seed=cfg.train.seed,
                      max_image_pixels=d.max_image_pixels, **extra_stream_fields(cfg))


def deepspeed_config(cfg: Config) -> dict[str, Any]:
    path = resolve_path(cfg.train.deepspeed)
    if not path.exists():
        raise ConfigError(f"config key train.deepspeed names {path}, which does not exist")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"DeepSpeed config {path} is not valid JSON: {exc}") from exc
    for key, ours in OWNED_DEEPSPEED_KEYS.items():
        if key in ds:
            raise ConfigError(f"DeepSpeed config {path} sets {key!r}; set {ours} in the navit-clip config instead")
    ds.update({
        "train_micro_batch_size_per_gpu": cfg.data.sequences_per_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.optim.grad_clip,
        "bf16": {"enabled": cfg.train.precision == "bf16"},
    })
    ds.setdefault("steps_per_print", 10**9)
    return ds


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices; leave biases, norms, the temperature and the pooling query alone."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (decay if param.ndim >= 2 and "query" not in name else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_engine(cfg: Config):
    """-> (engine, optimizer, scheduler) for NaViTCLIP under DeepSpeed."""
    import deepspeed

    torch.manual_seed(cfg.train.seed)
    model = NaViTCLIP(cfg.model)
    o = cfg.optim
    optimizer = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
    schedule = partial(warmup_cosine, total_steps=cfg.train.steps, warmup_steps=o.warmup_steps,
                       min_ratio=o.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    engine, optimizer, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                           config=deepspeed_config(cfg))
    engine.checkpoint_engine = SafeCheckpointEngine(config_params=engine._config)
    return engine, optimizer, scheduler


def train(cfg: Config) -> dict[str, Any]:
    """Train for cfg.train.steps steps (resuming if a checkpoint exists); return a summary."""
    dist.init_distributed()
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    out_dir = Path(cfg.train.out_dir)
    ckpt_dir = out_dir / "checkpoints"
    engine, _, scheduler = build_engine(cfg)
    device = engine.device

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
    stream_spec = train_stream_spec(cfg)
    stream_id = stream_identity(stream_spec, cfg)
    if found_step >= 0:
        path, client = engine.load_checkpoint(str(ckpt_dir), tag=step_tag(found_step))
        if path is None:
            raise RuntimeError(f"could not load checkpoint {step_tag(found_step)} from {ckpt_dir}")
        start_step, data_state = int(client["step"]), client["data"]
        check_same_stream(data_state.get("stream"), stream_id)
        log.info("resumed from %s at step %d", path, start_step)
    if dist.is_main():
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=2))
    metrics = JsonlLogger(out_dir / "metrics.jsonl", enabled=dist.is_main())

    batches = ResumableBatches(make_loader(stream_spec, rank=dist.rank(), world=dist.world_size(),
                                           num_workers=cfg.data.num_workers), data_state)
    progress = tqdm(range(start_step, cfg.train.steps), initial=start_step, total=cfg.train.steps,
                    disable=not dist.is_main(), desc="train", dynamic_ncols=True)
    loss_value, seen_images, skipped, tick = math.nan, 0, 0, time.perf_counter()
    skipped_by_reason: dict[str, int] = {}
    stop = StopRequest()
    done, stopping, last_logged = start_step, 0.0, start_step
    for step in progress:
        batch = next(batches)
        counts = torch.tensor([batch.num_images, batch.skipped_samples, int((batch.segment < 0).sum()),
                               float(stop.requested), *skip_counts(batch.skipped_by_reason)],
                              dtype=torch.float64, device=device)  # nccl: on the GPU
        out = engine(batch.to(device))
        loss = contrastive_loss(out["image"].float(), out["text"].float(), out["valid"], out["logit_scale"].float(),
                                None if "logit_bias" not in out else out["logit_bias"].float(), kind=cfg.model.loss,
                                chunk_size=cfg.model.loss_chunk_size, max_logit_scale=math.exp(cfg.model.max_logit_scale))
        engine.backward(loss)
        engine.step()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {loss.item()} at step {step}; lower optim.lr or check the data")
        images, skipped_now, padded, stopping, *reasons = dist.all_reduce_sum(counts).tolist()
        for reason, n in zip(SKIP_REASONS, reasons):
            if n:
                skipped_by_reason[reason] = skipped_by_reason.get(reason, 0) + int(n)
        seen_images += int(images)
        skipped += int(skipped_now)
        loss_value = loss.item()
        done = step + 1
        if done % cfg.train.log_every == 0 or done == cfg.train.steps or stopping:
            elapsed, tick = time.perf_counter() - tick, time.perf_counter()
            tokens = dist.world_size() * batch.num_sequences * batch.seq_len
            metrics.log(step=done, world_size=dist.world_size(), loss=loss_value, lr=scheduler.get_last_lr()[0],
                        logit_scale=out["logit_scale"].item(), images_per_step=int(images),
                        padding=padded / tokens, skipped_samples=skipped, skipped_by_reason=skipped_by_reason,
                        sec_per_step=elapsed / (done - last_logged))
            last_logged = done
            progress.set_postfix(loss=f"{loss_value:.3f}", imgs=int(images), scale=f"{out['logit_scale'].item():.1f}")
        if done % cfg.train.ckpt_every == 0 or done == cfg.train.steps or stopping:
            save_checkpoint(engine, ckpt_dir, done, {**batches.state_dict(), "stream": stream_id}, cfg)
        if stopping:
            log.warning("stop requested (SIGTERM/SIGINT): saved step %d to %s, exiting", done, ckpt_dir)
            break
    progress.close()
    stop.restore()
    return {"steps": done if stopping else cfg.train.steps, "stopped_early": bool(stopping),
            "resumed_from": start_step, "final_loss": loss_value,
            "images_seen": seen_images, "skipped_samples": skipped, "out_dir": str(out_dir),
            "checkpoint": str(ckpt_dir / (latest_tag(ckpt_dir) or ""))}


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


def save_checkpoint(engine, ckpt_dir: Path, step: int, data_state: dict, cfg: Config) -> None:
    tag = step_tag(step)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, save_latest=False,
                           client_state={"step": step, "data": data_state, "config": config_to_dict(cfg)})
    dist.barrier()  # every rank's files are written before `latest` may name them
    if dist.is_main():
        write_latest(ckpt_dir, tag)
        prune_checkpoints(ckpt_dir, cfg.train.keep_checkpoints)
    dist.barrier()


def stream_identity(spec: StreamSpec, cfg: Config) -> dict[str, Any]:
    """What determines the data stream, saved with each checkpoint. The shard paths may move;
    their number, the sizes, the packing, seeds, ranks and workers may not."""
    identity = {k: v for k, v in dataclasses.asdict(spec).items() if k != "shards"}
    return {**identity, "num_shards": len(expand_shards(spec.shards, spec.allow_pipe)), "world_size": dist.world_size(),
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
