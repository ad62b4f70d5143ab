"""Packed attention: every token attends only to tokens of its own image.

All backends share one signature, `attend(q, k, v, segment) -> out` with q, k, v of shape
[S, H, L, Dh] and segment [S, L] (slot id per token, -1 for padding), and pass the same tests
against `reference_attend`. Padding tokens attend to padding (never to an image), so no row is
empty and no NaN appears.

A packed forward calls attention once per block with the same segment, so every backend also has
`bind(segment) -> (q, k, v) -> out`, which does the per-batch work (block mask, image runs,
cumulative lengths) once and reuses it in every block.

Backends (model/packed_sdpa.py, model/attention_kernels.py):
- `reference`: softmax(QKᵀ/√d + mask) V written out; the ground truth.
- `sdpa`: torch SDPA with a dense [S, 1, L, L] block-diagonal mask; any device, any dtype.
- `sdpa_per_image`: one unmasked SDPA call per image (a slice of the sequence); cost Σ nᵢ².
- `sdpa_bucketed`: one SDPA call per power-of-two length bucket of images, each image padded to
  its bucket's longest with a key mask; cost ≤ 4 Σ nᵢ² in a few calls.
- `flex`: FlexAttention with a document block mask; compiled on GPU. On CPU it runs forward only
  (torch has no CPU backward for it), so CPU training never picks it.
- `flash`: flash-attn's varlen kernel over the image runs (fp16/bf16 on CUDA, if installed).
- `auto`: the fastest of the backends valid for the tensors it is given, by a short timed trial
  (forward, and backward when gradients are needed) on the first batch of each shape class; the
  choice is cached per (device, dtype, shape class) and logged. `NAVIT_CLIP_AUTO_ATTENTION=rule`
  replaces the trial by the fixed rule `rule_choice`, for runs that must pick the same backend
  in every process (tests comparing separate runs bit for bit).
"""

from __future__ import annotations

import logging
import math
import os
import time

import torch

from navit_clip.model.attention_kernels import (FLEX_BLOCK_SIZE, FlashVarlenBackend, FlexBackend,  # noqa: F401
                                                flash_available, flex_available)
from navit_clip.model.packed_sdpa import (Attend, Backend, BoundAttend, BucketedSdpa, FunctionBackend,  # noqa: F401
                                          PerImageSdpa, image_runs, reference_attend, same_segment_mask, sdpa_attend)

log = logging.getLogger(__name__)

BACKENDS: dict[str, Backend] = {
    "reference": FunctionBackend("reference", reference_attend),
    "sdpa": FunctionBackend("sdpa", sdpa_attend),
    "sdpa_per_image": PerImageSdpa(),
    "sdpa_bucketed": BucketedSdpa(),
    "flex": FlexBackend(),
    "flash": FlashVarlenBackend(),
}

AUTO_MODE_ENV = "NAVIT_CLIP_AUTO_ATTENTION"  # "measure" (default) or "rule"
TRIAL_REPEATS = 3  # timed calls per candidate after one untimed warm-up; the fastest counts


def candidates(device: torch.device, dtype: torch.dtype, head_dim: int) -> list[str]:
    """The backends `auto` may run for tensors on `device` of `dtype`. Flex is kept to CUDA and
    power-of-two head sizes (its best-trodden kernels); flash to CUDA, fp16/bf16 and flash-attn."""
    names = ["sdpa_bucketed", "sdpa", "sdpa_per_image"]
    if device.type == "cuda":
        if flash_available() and dtype in (torch.float16, torch.bfloat16):
            names.insert(0, "flash")
        if flex_available() and head_dim >= 16 and head_dim & (head_dim - 1) == 0:
            names.insert(0, "flex")
    return names


def rule_choice(device: torch.device, dtype: torch.dtype, head_dim: int = 64) -> Backend:
    """The fixed choice of `NAVIT_CLIP_AUTO_ATTENTION=rule`: the first candidate, i.e. flex on
    CUDA (power-of-two head sizes), else flash-attn if installed, else bucketed SDPA."""
    return BACKENDS[candidates(device, dtype, head_dim)[0]]


choose_backend = rule_choice


def shape_class(q: torch.Tensor, segment: torch.Tensor, grad: bool) -> tuple:
    """What the trial's answer is cached under: device, dtype, the tensor shapes, whether
    gradients are needed, and the images per sequence to the nearest power of two."""
    images = float((segment.max(dim=1).values + 1).float().mean())
    return (str(q.device), q.dtype, tuple(q.shape), grad, round(math.log2(max(1.0, images))))


def trial_seconds(backend: Backend, q: torch.Tensor, segment: torch.Tensor, grad: bool) -> float:
    """Fastest of TRIAL_REPEATS calls (after a warm-up, which also compiles) of `backend` on
    random tensors shaped like q, with backward when `grad`."""
    leaves = [torch.randn_like(q, requires_grad=grad) for _ in range(3)]
    bound = backend.bind(segment)

    def once() -> None:
        out = bound(*leaves)
        if grad:
            torch.autograd.grad(out, leaves, torch.ones_like(out))

    best = math.inf
    for repeat in range(TRIAL_REPEATS + 1):
        if q.is_cuda:
            torch.cuda.synchronize(q.device)
        start = time.perf_counter()
        once()
        if q.is_cuda:
            torch.cuda.synchronize(q.device)
        best = min(best, time.perf_counter() - start) if repeat else best
    return best


def measured_choice(q: torch.Tensor, segment: torch.Tensor, grad: bool) -> tuple[Backend, dict[str, float]]:
    """-> (the fastest candidate, seconds per candidate); a candidate that fails is left out."""
    seconds = {}
    grad_mode = torch.enable_grad() if grad else torch.no_grad()
    # a separate graph: the hooks of an enclosing activation checkpoint must not see it
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t), grad_mode:
        for name in candidates(q.device, q.dtype, q.shape[-1]):
            try:
                seconds[name] = trial_seconds(BACKENDS[name], q, segment, grad)
            except Exception as exc:  # noqa: BLE001 - a kernel that cannot run these shapes is not a candidate
                log.info("attention auto: %s left out (%s)", name, exc)
    return BACKENDS[min(seconds, key=seconds.get)], seconds


class AutoBackend(Backend):
    """Picks a backend per shape class of the tensors it is given (module docstring), once."""

    name = "auto"

    def __init__(self) -> None:
        self.chosen: dict[tuple, str] = {}

    def pick(self, q: torch.Tensor, segment: torch.Tensor) -> Backend:
        if torch.compiler.is_exporting():  # traced: no timing, no slicing at data-dependent image runs
            return BACKENDS["flex"] if q.is_cuda and rule_choice(q.device, q.dtype, q.shape[-1]).name == "flex" \
                else BACKENDS["sdpa"]
        grad = torch.is_grad_enabled() and q.requires_grad
        key = shape_class(q, segment, grad)
        if key not in self.chosen:
            if os.environ.get(AUTO_MODE_ENV, "measure") == "rule":
                backend, seconds = rule_choice(q.device, q.dtype, q.shape[-1]), {}
            else:
                backend, seconds = measured_choice(q, segment, grad)
            self.chosen[key] = backend.name
            log.info("attention auto: %s for %s %s q%s%s (%s)", backend.name, key[0], q.dtype, list(q.shape),
                     " with backward" if grad else "", ", ".join(f"{n} {s * 1e3:.1f} ms" for n, s in seconds.items())
                     or "fixed rule")
        return BACKENDS[self.chosen[key]]

    def bind(self, segment: torch.Tensor) -> BoundAttend:
        bound: dict[str, BoundAttend] = {}
        # Every block of one forward sees the same segments: read their shape class (a device sync
        # on CUDA) once per call shape, not once per block.
        picked: dict[tuple, Backend] = {}

        @torch.compiler.disable  # the trial times real calls; never traced
        def attend(q, k, v):
            call = (q.shape, q.dtype, q.device, torch.is_grad_enabled() and q.requires_grad)
            if call not in picked:
                picked[call] = self.pick(q, segment)
            backend = picked[call]
            if backend.name not in bound:
                bound[backend.name] = backend.bind(segment)
            return bound[backend.name](q, k, v)

        return attend


AUTO = AutoBackend()


def get_attend(name: str = "auto") -> Backend:
    """The named backend; `auto` picks the fastest one available for the tensors it sees."""
    if name == "auto":
        return AUTO
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r} (known: auto, {', '.join(BACKENDS)})")
    if name == "flash" and not flash_available():
        raise ValueError("model.vision.attention=flash needs the flash-attn package and a CUDA device")
    return BACKENDS[name]
