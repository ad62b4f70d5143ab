"""Packed attention: every token attends only to tokens of its own image.

All backends share one signature, `attend(q, k, v, segment) -> out` with q, k, v of shape
[S, H, L, Dh] and segment [S, L] (slot id per token, -1 for padding), and pass the same tests
against `reference_attend`. Padding tokens attend to padding (never to an image), so no row is
empty and no NaN appears.

A packed forward calls attention once per block with the same segment, so every backend also has
`bind(segment) -> (q, k, v) -> out`, which does the per-batch work (block mask, image runs,
cumulative lengths) once and reuses it in every block.

Backends:
- `reference`: softmax(QKᵀ/√d + mask) V written out; the ground truth.
- `sdpa`: torch SDPA with a dense [S, 1, L, L] block-diagonal mask; any device, any dtype.
- `sdpa_per_image`: one unmasked SDPA call per image (a slice of the sequence); cost Σ nᵢ² instead
  of L², no mask in memory. The CPU default for long sequences; trains (it is plain autograd).
- `flex`: FlexAttention with a document block mask; fully masked blocks are skipped. Compiled on
  GPU, over sequences padded to whole kernel tiles. On CPU it runs forward only (torch has no CPU
  backward for it), so CPU training never picks it.
- `flash`: flash-attn's varlen kernel over the image runs (fp16/bf16 on CUDA, if installed).
- `auto`: flex on CUDA (power-of-two head sizes), else flash-attn if installed, else
  sdpa_per_image; on CPU sdpa_per_image from L = 512 on, sdpa below.
"""

from __future__ import annotations

import importlib.util
import math
import warnings
from functools import lru_cache
from typing import Callable

import torch
import torch.nn.functional as F

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
BoundAttend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def same_segment_mask(segment: torch.Tensor) -> torch.Tensor:
    """[S, L] -> [S, 1, L, L] bool: True where query and key belong to the same image."""
    return (segment[:, :, None] == segment[:, None, :])[:, None]


def reference_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment: torch.Tensor) -> torch.Tensor:
    """Plain softmax(QKᵀ/√d + mask) V, written out: the ground truth for every other backend."""
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~same_segment_mask(segment), float("-inf"))
    return scores.softmax(dim=-1) @ v


def sdpa_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment: torch.Tensor) -> torch.Tensor:
    """torch's scaled_dot_product_attention with a block-diagonal boolean mask (any device)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=same_segment_mask(segment))


class Backend:
    """An attention backend: callable as attend(q, k, v, segment), and bindable to a segment."""

    name = "backend"

    def bind(self, segment: torch.Tensor) -> BoundAttend:
        return lambda q, k, v: self.attend(q, k, v, segment)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment: torch.Tensor) -> torch.Tensor:
        return self.bind(segment)(q, k, v)

    def __repr__(self) -> str:
        return f"<attention backend {self.name}>"


class FunctionBackend(Backend):
    def __init__(self, name: str, fn: Attend) -> None:
        self.name, self.fn = name, fn

    def attend(self, q, k, v, segment):
        return self.fn(q, k, v, segment)


def image_runs(segment: torch.Tensor) -> list[list[tuple[int, int]]] | None:
    """Per sequence, the (start, length) of each run of equal slot ids, padding runs included.
    None when some slot id occurs in two separate runs (then slicing cannot serve)."""
    seg = segment.detach().cpu()
    change = torch.ones_like(seg, dtype=torch.bool)
    change[:, 1:] = seg[:, 1:] != seg[:, :-1]
    out = []
    for s in range(seg.shape[0]):
        starts = change[s].nonzero().squeeze(1).tolist()
        bounds = [*starts, seg.shape[1]]
        runs = [(a, b - a) for a, b in zip(bounds[:-1], bounds[1:])]
        if len(runs) != len(seg[s].unique()):
            return None
        out.append(runs)
    return out


class PerImageSdpa(Backend):
    """One unmasked SDPA call per image: slices of the sequence, outputs concatenated back."""

    name = "sdpa_per_image"

    def bind(self, segment: torch.Tensor) -> BoundAttend:
        runs = image_runs(segment)
        if runs is None:
            return self._bind_gather(segment)

        def attend(q, k, v):
            rows = []
            for s, seq_runs in enumerate(runs):
                if len(seq_runs) == 1:
                    rows.append(F.scaled_dot_product_attention(q[s:s + 1], k[s:s + 1], v[s:s + 1]))
                    continue
                parts = [F.scaled_dot_product_attention(q[s:s + 1, :, a:a + n], k[s:s + 1, :, a:a + n],
                                                        v[s:s + 1, :, a:a + n]) for a, n in seq_runs]
                rows.append(torch.cat(parts, dim=2))
            return torch.cat(rows, dim=0)

        return torch.compiler.disable(attend)  # the image runs are Python data: no recompile per batch

    @staticmethod
    def _bind_gather(segment: torch.Tensor) -> BoundAttend:
        """Slot ids scattered over the sequence: gather each image's tokens, scatter results back."""
        groups = [(s, (segment[s] == slot).nonzero().squeeze(1)) for s in range(segment.shape[0])
                  for slot in segment[s].unique().tolist()]

        def attend(q, k, v):
            out = torch.empty_like(q)
            for s, index in groups:
                out[s][:, index] = F.scaled_dot_product_attention(q[s][:, index], k[s][:, index], v[s][:, index])
            return out

        return torch.compiler.disable(attend)

    def attend(self, q, k, v, segment):
        return self.bind(segment)(q, k, v)


@lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


# The tile of flex_attention's kernels and block mask (torch's default BLOCK_SIZE). Compiled flex
# gets whole tiles only: torch 2.14's CPU kernel is wrong when L is not a multiple of it (AMD EPYC).
FLEX_BLOCK_SIZE = 128
# The tokens added up to a whole tile: apart from every image and from the packer's padding (-1),
# they attend only to each other (no empty row, no NaN) and nothing attends to them.
TILE_PADDING_SEGMENT = -2


class FlexBackend(Backend):
    """FlexAttention with a document block mask: blocks where no query and key share an image are
    skipped, so the cost follows Σ nᵢ² at block granularity. Compiled where a GPU runs it, over
    sequences padded to whole FLEX_BLOCK_SIZE tiles; eager (forward only) on CPU, where torch
    implements it with a dense reference."""

    name = "flex"

    def __init__(self, compile: bool | None = None) -> None:
        self.compile = compile

    def bind(self, segment: torch.Tensor) -> BoundAttend:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        S, L = segment.shape
        compiled = self.compile if self.compile is not None else segment.is_cuda
        extra = -L % FLEX_BLOCK_SIZE if compiled else 0
        length = L + extra
        seg = F.pad(segment, (0, extra), value=TILE_PADDING_SEGMENT).contiguous()

        def same_image(b, h, q_idx, kv_idx):
            return seg[b, q_idx] == seg[b, kv_idx]

        block_mask = create_block_mask(same_image, B=S, H=None, Q_LEN=length, KV_LEN=length, device=seg.device)
        fn = _compiled_flex() if compiled else flex_attention

        def attend(q, k, v):
            if not q.is_cuda and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
                raise RuntimeError("model.vision.attention=flex has no backward on CPU; use sdpa_per_image "
                                   "(or auto) to train on CPU")
            if compiled:
                q, k, v = (F.pad(t, (0, 0, 0, extra)) if extra else t for t in (q, k, v))
                return fn(q, k, v, block_mask=block_mask)[:, :, :L]
            with warnings.catch_warnings():  # eager flex is the CPU forward path on purpose; no nag
                warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
                return fn(q, k, v, block_mask=block_mask)

        return attend

    def attend(self, q, k, v, segment):
        return self.bind(segment)(q, k, v)


def flash_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


class FlashVarlenBackend(Backend):
    """flash-attn's varlen kernel: the S·L tokens are one long stream cut at image boundaries
    (padding runs are their own pieces, so padding still attends to padding only)."""

    name = "flash"

    def bind(self, segment: torch.Tensor) -> BoundAttend:
        from flash_attn import flash_attn_varlen_func

        runs = image_runs(segment)
        if runs is None:
            raise ValueError("flash attention needs each image's tokens to be contiguous in its sequence")
        lengths = [n for seq_runs in runs for _, n in seq_runs]
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=segment.device)
        longest = max(lengths)

        def attend(q, k, v):
            S, H, L, Dh = q.shape
            flat = [t.transpose(1, 2).reshape(S * L, H, Dh) for t in (q, k, v)]
            out = flash_attn_varlen_func(*flat, cu, cu, longest, longest)
            return out.reshape(S, L, H, Dh).transpose(1, 2)

        return torch.compiler.disable(attend)

    def attend(self, q, k, v, segment):
        return self.bind(segment)(q, k, v)


BACKENDS: dict[str, Backend] = {
    "reference": FunctionBackend("reference", reference_attend),
    "sdpa": FunctionBackend("sdpa", sdpa_attend),
    "sdpa_per_image": PerImageSdpa(),
    "flex": FlexBackend(),
    "flash": FlashVarlenBackend(),
}


def flex_available() -> bool:
    return importlib.util.find_spec("torch.nn.attention.flex_attention") is not None


# On CPU, one SDPA call per image beats the dense mask from about L = 512 on (fwd+bwd, LAION
# sizes with resolution sampling: 0.7x at L=256, 1.2-1.3x at 512, 2.2-2.5x at 1024); below that
# the per-call overhead of many small images outweighs the L² the mask wastes.
CPU_PER_IMAGE_MIN_LEN = 512


def choose_backend(device: torch.device, dtype: torch.dtype, head_dim: int = 64, seq_len: int = 1024) -> Backend:
    """What `auto` runs for tensors on `device` of `dtype`. Flex is kept to power-of-two head
    sizes (its best-trodden kernels); others (So400m's 72) go to flash-attn or per-image SDPA.
    On CPU: per-image SDPA for long sequences, the dense mask for short ones."""
    if device.type == "cuda":
        if flex_available() and head_dim >= 16 and head_dim & (head_dim - 1) == 0:
            return BACKENDS["flex"]
        if flash_available() and dtype in (torch.float16, torch.bfloat16):
            return BACKENDS["flash"]
        return BACKENDS["sdpa_per_image"]
    return BACKENDS["sdpa_per_image"] if seq_len >= CPU_PER_IMAGE_MIN_LEN else BACKENDS["sdpa"]


class AutoBackend(Backend):
    """Picks a backend from the device and dtype of the tensors it is given."""

    name = "auto"

    def bind(self, segment: torch.Tensor) -> BoundAttend:
        bound: dict[tuple, BoundAttend] = {}

        def attend(q, k, v):
            key = (q.device, q.dtype, q.shape[-1], q.shape[-2])
            if key not in bound:
                bound[key] = choose_backend(*key).bind(segment)
            return bound[key](q, k, v)

        return attend

    def attend(self, q, k, v, segment):
        return self.bind(segment)(q, k, v)


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
