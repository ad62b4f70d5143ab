"""Pre-packed shards: samples that are ready packed sequences, so training reads without decoding.

Each sample is one sequence: `patches.npy` [L, P*P*C] uint8, `coords.npy` [L, 2] int16,
`segment.npy` [L] int16 (-1 = padding), `grid.npy` [E_max, 2] int16, `text.npy` [E_max, T] int32
and `json` {"format", "keys"}. Arrays are numpy .npy bytes read with allow_pickle=False: nothing
from a shard is ever unpickled.
"""

from __future__ import annotations

import io
import logging
import tarfile
from typing import Any, Iterable, Iterator

import numpy as np
import torch

from navit_clip.batch import PackedBatch

log = logging.getLogger(__name__)

FORMAT = "navit-clip-packed-1"
ARRAYS = {"patches": np.uint8, "coords": np.int16, "segment": np.int16, "grid": np.int16, "text": np.int32}


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def batch_to_samples(batch: PackedBatch, first_index: int) -> list[dict[str, Any]]:
    """The non-empty sequences of a batch as shard samples (keys seq000000042, ...)."""
    out = []
    for s in range(batch.num_sequences):
        if not batch.valid[s].any():
            continue  # end-of-stream filler; the reader pads the last batch again
        sample: dict[str, Any] = {"__key__": f"seq{first_index + len(out):09d}",
                                  "json": {"format": FORMAT, "keys": list(batch.keys[s])}}
        for name, dtype in ARRAYS.items():
            sample[f"{name}.npy"] = _npy(getattr(batch, name)[s].numpy().astype(dtype))
        out.append(sample)
    return out


class BadSequence(ValueError):
    pass


def decode_sequence(raw: dict[str, Any], seq_len: int, max_images: int, text_len: int) -> dict[str, Any]:
    """One raw shard sample -> arrays of one sequence; BadSequence names what is wrong."""
    import json

    arrays: dict[str, Any] = {}
    for name in ARRAYS:
        data = raw.get(f"{name}.npy")
        if data is None:
            raise BadSequence(f"missing_{name}")
        try:
            arrays[name] = np.load(io.BytesIO(data), allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise BadSequence(f"bad_{name}") from exc
    try:
        meta = json.loads(raw.get("json", b"{}").decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadSequence("bad_json") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise BadSequence("not_packed_format")
    L, E = seq_len, max_images
    expect = {"patches": (L,), "coords": (L, 2), "segment": (L,), "grid": (E, 2), "text": (E, text_len)}
    for name, shape in expect.items():
        if arrays[name].shape[: len(shape)] != shape:
            raise BadSequence(f"shape_{name}")
    keys = meta.get("keys", [])
    if len(keys) != int((arrays["grid"][:, 0] > 0).sum()):
        raise BadSequence("keys_mismatch")
    arrays["keys"] = tuple(str(k) for k in keys)
    return arrays


def shard_holds_packed(path: str) -> bool:
    """True if the first member of a local tar shard is a pre-packed sequence array."""
    try:
        with tarfile.open(path) as tar:
            member = tar.next()
    except (OSError, tarfile.TarError):
        return False
    return member is not None and member.name.endswith(tuple(f".{name}.npy" for name in ARRAYS))


def sequences_to_batch(sequences: list[dict[str, Any]], sequences_per_batch: int, seq_len: int, max_images: int,
                       patch_dim: int, text_len: int) -> PackedBatch:
    """Stack decoded sequences into a PackedBatch; missing sequences are empty (all padding)."""
    S = sequences_per_batch
    patches = np.zeros((S, seq_len, patch_dim), np.uint8)
    coords = np.zeros((S, seq_len, 2), np.int64)
    segment = np.full((S, seq_len), -1, np.int64)
    grid = np.zeros((S, max_images, 2), np.int64)
    text = np.zeros((S, max_images, text_len), np.int64)
    keys = []
    for s, seq in enumerate(sequences):
        patches[s], coords[s], segment[s] = seq["patches"], seq["coords"], seq["segment"]
        grid[s], text[s] = seq["grid"], seq["text"]
        keys.append(seq["keys"])
    keys += [()] * (S - len(sequences))
    valid = np.zeros((S, max_images), bool)
    for s, k in enumerate(keys):
        valid[s, : len(k)] = True
    return PackedBatch(patches=torch.from_numpy(patches), coords=torch.from_numpy(coords),
                       segment=torch.from_numpy(segment), grid=torch.from_numpy(grid),
                       valid=torch.from_numpy(valid), text=torch.from_numpy(text), keys=tuple(keys))


def group(sequences: Iterable[dict[str, Any]], size: int, pad_last: bool) -> Iterator[list[dict[str, Any]]]:
    chunk: list[dict[str, Any]] = []
    for seq in sequences:
        chunk.append(seq)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk and pad_last:
        yield chunk


def write_packed_shards(batches: Iterable[PackedBatch], pattern: str, sequences_per_shard: int) -> list[str]:
    """Write the non-empty sequences of `batches`, in order, to shards named by pattern % i."""
    from navit_clip.data.shard_files import write_shards

    def samples() -> Iterator[dict[str, Any]]:
        written = 0
        for batch in batches:
            for sample in batch_to_samples(batch, written):
                written += 1
                yield sample

    return write_shards(samples(), pattern, max_per_shard=sequences_per_shard)
