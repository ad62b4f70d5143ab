"""The DeepSpeed engine: our config -> DeepSpeed config, AdamW parameter groups, LR schedule.

Batch geometry, precision, clipping, accumulation and the optimizer come from the navit-clip
config; the DeepSpeed JSON (`configs/deepspeed/`) only says how to distribute (ZeRO stage,
buckets, offload), so the two can never disagree.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import nn

from navit_clip import dist
from navit_clip.config import Config, ConfigError, resolve_path
from navit_clip.model.clip import NaViTCLIP
from navit_clip.train.checkpoint import safe_checkpoint_engine
from navit_clip.train.schedule import WarmupCosine

# A DeepSpeed JSON that sets one of these is refused rather than silently disagreeing with ours.
OWNED_DEEPSPEED_KEYS = {
    "train_batch_size": "data.sequences_per_batch",
    "train_micro_batch_size_per_gpu": "data.sequences_per_batch",
    "gradient_accumulation_steps": "train.grad_accum_steps",
    "gradient_clipping": "optim.grad_clip",
    "bf16": "train.precision",
    "fp16": "train.precision",
    "optimizer": "optim.*",
    "scheduler": "optim.*",
}

# Layers whose weight matrices get weight decay. Everything else is left alone: embeddings and
# position tables (decay would pull rarely seen tokens and positions to zero), norms, biases, the
# temperature/bias of the loss and the pooling queries.
DECAYED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)


def deepspeed_config(cfg: Config, *, load_universal: bool = False) -> dict[str, Any]:
    """The DeepSpeed config: train.deepspeed's JSON plus what our config owns. `load_universal`:
    the checkpoint to resume is a universal one (train/universal.py)."""
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
        "gradient_accumulation_steps": cfg.train.grad_accum_steps,
        "gradient_clipping": cfg.optim.grad_clip,
        "bf16": {"enabled": cfg.train.precision == "bf16"},
    })
    ds.setdefault("steps_per_print", 10**9)
    if load_universal:
        ds["checkpoint"] = {**ds.get("checkpoint", {}), "load_universal": True}
    return ds


def zero_stage(cfg: Config) -> int:
    """The ZeRO stage train.deepspeed asks for (0 when it says none)."""
    return int(deepspeed_config(cfg).get("zero_optimization", {}).get("stage", 0))


def decay_split(model: nn.Module) -> tuple[list[str], list[str]]:
    """-> (names of parameters with weight decay, names without), in model order."""
    decayed = {id(m.weight) for m in model.modules() if isinstance(m, DECAYED_LAYERS)}
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decay if id(param) in decayed else no_decay).append(name)
    return decay, no_decay


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    params = dict(model.named_parameters())
    decay, no_decay = decay_split(model)
    return [{"params": [params[n] for n in decay], "weight_decay": weight_decay},
            {"params": [params[n] for n in no_decay], "weight_decay": 0.0}]


def build_engine(cfg: Config, *, load_universal: bool = False):
    """-> (engine, optimizer, scheduler) for NaViTCLIP under DeepSpeed."""
    import deepspeed

    torch.manual_seed(cfg.train.seed)
    model = NaViTCLIP(cfg.model)
    optimizer = adamw(param_groups(model, cfg.optim.weight_decay), cfg, dist.device())
    # DeepSpeed steps the scheduler once per optimizer step (not per micro-batch), and not at all
    # for a step it skipped.
    schedule = WarmupCosine(cfg.train.steps, cfg.optim.warmup_steps, cfg.optim.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    engine, optimizer, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                           config=deepspeed_config(cfg, load_universal=load_universal))
    engine.checkpoint_engine = safe_checkpoint_engine(engine._config)
    if engine.zero_optimization_stage() == 0 and dist.world_size() == 1:
        # Nothing to average over: DeepSpeed would still copy every gradient into flat buckets,
        # "all-reduce" them with itself and copy them back, at every step.
        engine.enable_backward_allreduce = False
    return engine, optimizer, scheduler


def adamw(groups: list[dict[str, Any]], cfg: Config, device: torch.device) -> torch.optim.AdamW:
    """AdamW as optim.* says, with torch's fused kernel on CPU and CUDA (one pass over every
    parameter; the default runs a dozen kernels per parameter tensor: 244 against 27 ms per step
    for the default model on one CPU core), foreach kernels elsewhere."""
    o = cfg.optim
    kernel = {"fused": True} if device.type in ("cpu", "cuda") else {"foreach": True}
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, **kernel)


def tower_sizes(model: nn.Module) -> dict[str, int]:
    """Parameters per tower, for the FLOP estimate (ZeRO-3 keeps the full count in ds_numel)."""
    def count(module: nn.Module) -> int:
        return sum(int(getattr(p, "ds_numel", p.numel())) for p in module.parameters())

    return {"vision": count(model.image), "text": count(model.text)}


def param_checksum(model: nn.Module) -> torch.Tensor:
    """[sum, sum of squares, position-weighted sum] of all parameters in float64: equal on every
    rank exactly when the replicas agree (not meaningful under ZeRO-3, which partitions them)."""
    params = list(model.parameters())
    total = torch.zeros(3, dtype=torch.float64, device=params[0].device)
    for i, p in enumerate(params):
        x = p.detach().double()
        total += torch.stack([x.sum(), (x * x).sum(), (i + 1) * x.sum()])
    return total
