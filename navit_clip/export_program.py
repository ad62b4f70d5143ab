"""The exported image encoder as a `torch.export` program: the packed forward at fixed shapes,
for serving without Python model code (`navit-clip export --torch-export S`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from navit_clip.export import ImageEncoder


class PackedImageEncoder(nn.Module):
    """The image encoder on packed tensors only, every shape fixed: what torch.export traces."""

    def __init__(self, encoder: ImageEncoder) -> None:
        super().__init__()
        self.tower, self.max_images = encoder, encoder.max_images

    def forward(self, patches: torch.Tensor, coords: torch.Tensor, segment: torch.Tensor) -> torch.Tensor:
        """patches [S, L, P·P·C] uint8, coords [S, L, 2], segment [S, L] -> normalized [S, E_max, D]
        (empty slots are zeros)."""
        return F.normalize(self.tower.embed(patches, coords, segment, self.max_images), dim=-1)


def export_program(encoder: ImageEncoder, num_sequences: int = 1) -> torch.export.ExportedProgram:
    """torch.export of the packed forward at S=num_sequences, L=seq_len, E_max=max_images. The
    program skips the eager check that patch coordinates fit the position table: pack with
    `encoder.pack_images` (or the data pipeline), which never produces larger ones."""
    cfg = encoder.cfg
    S, L = num_sequences, encoder.seq_len
    example = (torch.zeros(S, L, cfg.patch_size * cfg.patch_size * cfg.channels, dtype=torch.uint8),
               torch.zeros(S, L, 2, dtype=torch.int64), torch.full((S, L), -1, dtype=torch.int64))
    device = encoder.proj.weight.device
    with torch.no_grad():
        return torch.export.export(PackedImageEncoder(encoder).eval(), tuple(t.to(device) for t in example))
