"""One optimizer step over train.grad_accum_steps micro-batches, with the NaN/Inf guard, and the
counts (images, tokens, skipped samples, dropped batches) that the metrics rows and the summary report.

NaN/Inf guard: the loss's finiteness travels in the per-micro-batch all-reduce, so every rank drops
a non-finite micro-batch before its backward, together. Without accumulation the step is skipped
(weights, optimizer state and LR schedule unchanged); with it, the next micro-batch takes the
dropped one's place so that DeepSpeed's accumulation boundary stays in step.

Data failures: every micro-batch is fetched through `agreed`, so a rank whose data failed stops
every rank before the forward pass, with one error naming it (train/data_failure.py).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from dataclasses import dataclass
from typing import Protocol

import torch

from navit_clip import dist
from navit_clip.batch import PackedBatch
from navit_clip.config import Config
from navit_clip.data.loader import ResumableBatches
from navit_clip.data.shards import SKIP_REASONS, skip_counts
from navit_clip.loss import contrastive_loss
from navit_clip.train.data_failure import agreed
from navit_clip.train.flops import BACKWARD_PER_FORWARD, training_flops

log = logging.getLogger(__name__)

# Fault injection for tests: "STEP:RANK" makes the loss of that (1-based) step NaN on that rank.
FAULT_ENV = "NAVIT_CLIP_FAULT_NONFINITE"
# A run whose loss stays non-finite this many steps (or micro-batches) in a row is broken, not unlucky.
MAX_NONFINITE_IN_A_ROW = 20

SUMMED = ("images", "skipped_samples", "padded_tokens", "tokens", "text_tokens", "nonfinite", "truncated_captions",
          "flops")


class StopFlag(Protocol):
    requested: bool


@dataclass
class Counts:
    """Micro-batch counts summed over all ranks: of one step, or of the run so far."""

    images: int = 0
    skipped_samples: int = 0
    skipped_by_reason: dict[str, int] = dataclasses.field(default_factory=dict)
    padded_tokens: int = 0
    tokens: int = 0
    text_tokens: int = 0
    nonfinite: int = 0  # micro-batches dropped for a non-finite loss
    truncated_captions: int = 0  # captions cut to model.text.context_length
    nonfinite_in_row: int = 0  # failures (dropped micro-batches, or skipped steps) since the last success
    flops: float = 0.0  # training FLOPs of both towers (train/flops.py); a dropped micro-batch's forward only

    def add(self, other: Counts) -> None:
        """Add other's counts to these: the one place where skip counts are merged."""
        for name in SUMMED:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for reason, n in other.skipped_by_reason.items():
            self.skipped_by_reason[reason] = self.skipped_by_reason.get(reason, 0) + n

    def streak(self, failed: bool, what: str, step: int) -> None:
        """Count failures in a row: a loss that stays non-finite this long is a broken run."""
        self.nonfinite_in_row = self.nonfinite_in_row + 1 if failed else 0
        if self.nonfinite_in_row >= MAX_NONFINITE_IN_A_ROW:
            raise FloatingPointError(f"the loss was non-finite {self.nonfinite_in_row} {what} in a row "
                                     f"(last: step {step}); lower optim.lr or check the data")


@dataclass
class StepStats(Counts):
    """One optimizer step, summed over its micro-batches and all ranks."""

    losses: list[float] = dataclasses.field(default_factory=list)
    applied: bool = False
    stop: bool = False
    logit_scale: float = math.nan

    @property
    def loss(self) -> float:
        return sum(self.losses) / len(self.losses) if self.losses else math.nan


def fault_step(rank: int) -> int | None:
    """The step whose loss FAULT_ENV poisons on this rank, if any."""
    spec = os.environ.get(FAULT_ENV, "")
    if not spec:
        return None
    step, fault_rank = (int(x) for x in spec.split(":"))
    return step if fault_rank == rank else None


def reduce_counts(batch: PackedBatch, loss: torch.Tensor, stop: StopFlag, device: torch.device,
                  flops: float = 0.0) -> tuple[Counts, bool, int]:
    """One micro-batch's counts (and its training `flops` on this rank) summed over all ranks in a
    single all-reduce -> (counts, whether any rank asked to stop, how many ranks saw a non-finite loss)."""
    slots = batch.num_sequences * batch.seq_len
    local = torch.tensor([batch.num_images, batch.skipped_samples, int((batch.segment < 0).sum()), slots,
                          batch.num_images * batch.text.shape[-1], float(stop.requested),
                          float(not torch.isfinite(loss)), batch.truncated_captions, flops, *skip_counts(batch.skipped_by_reason)],
                         dtype=torch.float64, device=device)  # nccl: on the GPU
    images, skipped, padded, tokens, text_tokens, stopping, bad, truncated, flops, *reasons = \
        dist.all_reduce_sum(local).tolist()
    counts = Counts(images=int(images), skipped_samples=int(skipped), padded_tokens=int(padded), tokens=int(tokens),
                    text_tokens=int(text_tokens), nonfinite=int(bad > 0), truncated_captions=int(truncated), flops=flops,
                    skipped_by_reason={r: int(n) for r, n in zip(SKIP_REASONS, reasons) if n})
    return counts, bool(stopping), int(bad)


def train_step(engine, batches: ResumableBatches, cfg: Config, stop: StopFlag, step: int,
               poison_step: int | None) -> StepStats:
    """Forward, backward and optimizer step over train.grad_accum_steps micro-batches (see the
    module docstring for the non-finite guard)."""
    gas, stats = cfg.train.grad_accum_steps, StepStats()
    while len(stats.losses) < gas:
        batch = agreed(lambda: next(batches))  # a rank whose data failed stops every rank here
        out = engine(batch.to(engine.device))
        # the loss computes in fp32 whatever the towers' dtype, and returns gradients in that dtype
        loss = contrastive_loss(out["image"], out["text"], out["valid"], out["logit_scale"], out.get("logit_bias"),
                                kind=cfg.model.loss, chunk_size=cfg.model.loss_chunk_size,
                                max_logit_scale=math.exp(cfg.model.max_logit_scale))
        if poison_step == step + 1 and not stats.nonfinite:
            loss = loss * math.nan
        counts, stopping, bad_ranks = reduce_counts(batch, loss, stop, engine.device, training_flops(cfg.model, batch))
        if bad_ranks:  # dropped before its backward
            counts.flops /= 1.0 + BACKWARD_PER_FORWARD
        stats.add(counts)
        stats.stop = stats.stop or stopping
        stats.logit_scale = out["logit_scale"].item()
        if bad_ranks:
            log.warning("non-finite loss at step %d on %d rank(s): batch dropped on every rank%s", step + 1, bad_ranks,
                        "" if gas > 1 else ", optimizer step skipped")
        stats.streak(bool(bad_ranks), "micro-batches", step + 1)
        if not bad_ranks:
            engine.backward(loss)
            engine.step()
            stats.losses.append(loss.item())
        elif gas == 1:
            return stats  # the optimizer step is skipped
    stats.applied = True
    return stats
