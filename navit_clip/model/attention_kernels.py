"""The GPU kernels for packed attention: FlexAttention with a document block mask, and
flash-attn's varlen kernel over the image runs. Same interface as the SDPA backends
(model/packed_sdpa.py)."""

from __future__ import annotations

import importlib.util
import warnings
from functools import lru_cache

import torch
import torch.nn.functional as F

from navit_clip.model.packed_sdpa import Backend, BoundAttend, image_runs


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


def flex_available() -> bool:
    return importlib.util.find_spec("torch.nn.attention.flex_attention") is not None


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
