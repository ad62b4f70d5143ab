"""Random packed attention inputs shared by the CPU and GPU attention tests: segments laid out
as the packer lays them out (contiguous image runs, then padding)."""

from __future__ import annotations

import torch


def random_segments(S: int, L: int, max_images: int, generator: torch.Generator) -> torch.Tensor:
    """[S, L] slot ids in contiguous runs (like the packer lays them out), then -1 padding.
    Every sequence has at least one image and at least one padding token except the last one,
    which is completely full, so both cases are covered."""
    segment = torch.full((S, L), -1, dtype=torch.long)
    for s in range(S):
        n_images = int(torch.randint(1, max_images + 1, (1,), generator=generator))
        used = L if s == S - 1 else int(torch.randint(n_images, L, (1,), generator=generator))
        cuts = sorted(torch.randperm(used - 1, generator=generator)[: n_images - 1].add(1).tolist())
        bounds = [0, *cuts, used]
        for slot in range(n_images):
            segment[s, bounds[slot]:bounds[slot + 1]] = slot
    return segment


def random_qkv(S=3, H=2, L=24, Dh=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(S, H, L, Dh, generator=g) for _ in range(3))
    segment = random_segments(S, L, max_images=4, generator=g)
    return q, k, v, segment
