"""PackedBatch: the one contract between the data side and the model.

Several images, each at its own resolution and aspect ratio, are cut into patches and packed
into S sequences of exactly L tokens; each sequence holds at most E_max images ("slots").
Fixed shapes keep every rank's step identical in size, whatever images it drew.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch


@dataclass
class PackedBatch:
    patches: torch.Tensor  # [S, L, P*P*C] uint8 (or float for gradient checks), layout (p1 p2 c)
    coords: torch.Tensor  # [S, L, 2] int64: (row, col) of the patch inside its image's grid
    segment: torch.Tensor  # [S, L] int64: slot 0..E_max-1 of the token's image, -1 = padding
    grid: torch.Tensor  # [S, E_max, 2] int64: (rows, cols) of each slot's full patch grid
    valid: torch.Tensor  # [S, E_max] bool: the slot holds an image
    text: torch.Tensor  # [S, E_max, T] int64: caption token ids of each slot (zeros if empty)
    keys: tuple[tuple[str, ...], ...] = field(default=())  # per sequence, per filled slot
    skipped_samples: int = 0  # corrupt samples the reader skipped since its previous batch
    skipped_by_reason: dict = field(default_factory=dict)  # the same skips by reason, e.g. {"no_caption": 2}
    truncated_captions: int = 0  # captions cut to the context length since the reader's previous batch
    stream_state: dict | None = None  # the reader's position after this batch (plain data), for resume

    @property
    def num_sequences(self) -> int:
        return self.patches.shape[0]

    @property
    def seq_len(self) -> int:
        return self.patches.shape[1]

    @property
    def max_images(self) -> int:
        return self.valid.shape[1]

    @property
    def num_images(self) -> int:
        return int(self.valid.sum())

    def padding_fraction(self) -> float:
        """Share of token positions that carry no patch."""
        return float((self.segment < 0).float().mean())

    def flat_keys(self) -> list[str | None]:
        """Sample key of each of the S*E_max slots in row-major order, None for empty slots."""
        out: list[str | None] = []
        for s in range(self.num_sequences):
            seq_keys = self.keys[s] if s < len(self.keys) else ()
            out.extend(list(seq_keys) + [None] * (self.max_images - len(seq_keys)))
        return out

    def to(self, device: torch.device | str) -> "PackedBatch":
        moved = {
            f.name: getattr(self, f.name).to(device, non_blocking=True)
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return replace(self, **moved)

    def validate(self) -> None:
        """Raise ValueError naming the first field whose shape or content breaks the contract."""
        S, L = self.segment.shape
        E = self.valid.shape[1]
        expect = {
            "patches": (S, L),
            "coords": (S, L, 2),
            "grid": (S, E, 2),
            "valid": (S, E),
            "text": (S, E),
        }
        for name, shape in expect.items():
            got = tuple(getattr(self, name).shape[: len(shape)])
            if got != shape:
                raise ValueError(f"PackedBatch.{name} has shape {got}, expected {shape} (S={S}, L={L}, E_max={E})")
        if int(self.segment.max()) >= E:
            raise ValueError(f"PackedBatch.segment names slot {int(self.segment.max())} but E_max={E}")
        used = torch.zeros(S, E, dtype=torch.bool)
        seg = self.segment.cpu()
        for s in range(S):
            ids = seg[s][seg[s] >= 0].unique()
            used[s, ids] = True
        if not torch.equal(used, self.valid.cpu()):
            raise ValueError("PackedBatch.valid disagrees with the slots that segment uses")
