"""A packer's buffers as sample references, and the packer rebuilt from them.

Between two batches a packer holds images in its lookahead buffer, its open sequences and its
closed sequences not yet emitted. Each image carries the reference it was made from
(`PatchedImage.origin`, with the shrink exact-fill applied, if any), so the state is plain data
and a resume makes only those images again.
"""

from __future__ import annotations

from typing import Callable

from navit_clip.data.exact_fill import ExactFillPacker, shrink
from navit_clip.data.packing import PatchedImage, StreamingPacker, _Sequence

COUNTERS = ("tokens_emitted", "tokens_filled", "images_emitted", "images_shrunk", "tokens_shrunk")


def packer_state(packer: StreamingPacker) -> dict | None:
    """The packer's held images as references (None if one has no reference)."""
    held = [*packer._buffer, *(im for s in packer._open for im in s.images),
            *(im for s in packer._closed for im in s.images)]
    if any(image.origin is None for image in held):
        return None
    return {"buffer": [im.origin for im in packer._buffer],
            "open": [[im.origin for im in s.images] for s in packer._open],
            "closed": [[im.origin for im in s.images] for s in packer._closed],
            "shape": list(packer._shape) if packer._shape else None,
            "counters": {name: getattr(packer, name) for name in COUNTERS if hasattr(packer, name)}}


def restore_packer(packer: StreamingPacker, state: dict,
                   remake: Callable[[list[dict]], list[PatchedImage]]) -> None:
    """Fill `packer` with the images of `state`; `remake` makes images again from references
    (before any shrink, which is applied here as it was)."""
    origins = [*state["buffer"], *(o for s in state["open"] for o in s), *(o for s in state["closed"] for o in s)]
    bases = remake([{k: v for k, v in o.items() if k != "shrink"} for o in origins])
    images = iter(_shrunk(base, origin, packer) for base, origin in zip(bases, origins))
    packer._buffer = [next(images) for _ in state["buffer"]]
    packer._open = [_sequence(packer.seq_len, [next(images) for _ in s]) for s in state["open"]]
    packer._closed = [_sequence(packer.seq_len, [next(images) for _ in s]) for s in state["closed"]]
    packer._shape = tuple(state["shape"]) if state["shape"] else None
    for name, value in state["counters"].items():
        setattr(packer, name, value)


def _shrunk(image: PatchedImage, origin: dict, packer: StreamingPacker) -> PatchedImage:
    if "shrink" not in origin:
        return image
    if not isinstance(packer, ExactFillPacker):
        raise ValueError("a saved data stream holds an exact-fill image, but data.packing.exact_fill is off")
    tokens, grid = origin["shrink"]
    return shrink(image, tokens, tuple(grid) if grid else None, packer.patch_size)


def _sequence(capacity: int, images: list[PatchedImage]) -> _Sequence:
    seq = _Sequence(capacity)
    for image in images:
        seq.add(image)
    return seq
