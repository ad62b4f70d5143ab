"""NaViT image tower: packed patches of many images in, one pooled vector per image slot out.

patches [S, L, P·P·C] -> LN, linear, LN -> + pos-emb(row, col; rows, cols) -> blocks whose
attention keeps each image to itself -> LN -> masked pooling -> [S, E_max, width].

The per-batch attention work (block mask, image runs) is done once per forward and shared by all
blocks (`Backend.bind`). Padding tokens get position (0, 0) of a 1×1 grid, so whatever a padding
slot holds cannot change any output.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from navit_clip.config import VisionConfig
from navit_clip.model.attention import get_attend
from navit_clip.model.pooling import build_pool
from navit_clip.model.posemb import build_posemb
from navit_clip.model.transformer import Block

# Pixel statistics of the CLIP pre-training data; any fixed choice works, this one is familiar.
PIXEL_MEAN = (0.48145466, 0.4578275, 0.40821073)
PIXEL_STD = (0.26862954, 0.26130258, 0.27577711)


class NaViT(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        patch_dim = cfg.patch_size * cfg.patch_size * cfg.channels
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN[: cfg.channels]), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD[: cfg.channels]), persistent=False)
        self.patch_embed = nn.Sequential(nn.LayerNorm(patch_dim), nn.Linear(patch_dim, cfg.width), nn.LayerNorm(cfg.width))
        self.pos_emb = build_posemb(dim=cfg.width, max_side=cfg.max_grid_side, kind=cfg.posemb,
                                    coords=cfg.posemb_coords, combine=cfg.posemb_combine)
        self.blocks = nn.ModuleList(Block(dim=cfg.width, heads=cfg.heads, mlp_ratio=cfg.mlp_ratio,
                                          checkpointing=cfg.grad_checkpointing) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width)
        self.pool = build_pool(cfg.pooling, dim=cfg.width, heads=cfg.heads)
        self.attend = get_attend(cfg.attention)
        if cfg.compile:
            for block in self.blocks:
                block.compile()

    def normalize(self, patches: torch.Tensor) -> torch.Tensor:
        """uint8 (or float 0..255) patches in (p1 p2 c) order -> standardized float."""
        x = rearrange(patches.float() / 255.0, "... (pp c) -> ... pp c", c=self.cfg.channels)
        dtype = self.patch_embed[1].weight.dtype
        return rearrange((x - self.pixel_mean) / self.pixel_std, "... pp c -> ... (pp c)").to(dtype)

    def position_embedding(self, coords: torch.Tensor, segment: torch.Tensor,
                           grid: torch.Tensor | None) -> torch.Tensor:
        """[S, L, width]; each token's image side lengths come from `grid` [S, E_max, 2] (the full
        grid before dropping). Without `grid` only absolute kinds within the table work."""
        pad = segment < 0
        coords = coords.masked_fill(pad[..., None], 0)
        sides = None
        if grid is not None:
            sides = torch.gather(grid, 1, segment.clamp(min=0)[..., None].expand(*segment.shape, 2))
            sides = sides.masked_fill(pad[..., None], 1)
        return self.pos_emb(coords, sides).to(self.patch_embed[1].weight.dtype)

    def forward_tokens(self, patches: torch.Tensor, coords: torch.Tensor, segment: torch.Tensor,
                       layers: tuple[int, ...] = (), grid: torch.Tensor | None = None,
                       ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Token features [S, L, width] after the final norm, plus {block index: output} for the
        blocks named in `layers` (0-based), for dense downstream heads."""
        bad = [i for i in layers if not 0 <= i < len(self.blocks)]
        if bad:
            raise ValueError(f"layers {bad} do not exist: the model has blocks 0..{len(self.blocks) - 1}")
        x = self.patch_embed(self.normalize(patches)) + self.position_embedding(coords, segment, grid)
        attend = self.attend.bind(segment)
        kept: dict[int, torch.Tensor] = {}
        for index, block in enumerate(self.blocks):
            x = block(x, attend)
            if index in layers:
                kept[index] = x
        return self.norm(x), kept

    def forward(self, patches: torch.Tensor, coords: torch.Tensor, segment: torch.Tensor, max_images: int,
                grid: torch.Tensor | None = None) -> torch.Tensor:
        """-> pooled [S, max_images, width]; empty slots are zeros. `grid` [S, E_max, 2] is needed
        by fractional position embeddings and by absolute ones beyond max_grid_side."""
        tokens, _ = self.forward_tokens(patches, coords, segment, grid=grid)
        return self.pool(tokens, segment, max_images)


def unpack_grids(tokens: torch.Tensor, coords: torch.Tensor, segment: torch.Tensor, grid: torch.Tensor,
                 valid: torch.Tensor) -> list[torch.Tensor]:
    """Token features [S, L, D] -> one [rows, cols, D] grid per valid slot, in slot order.
    Dropped patches (if any) stay zero."""
    out = []
    for s, e in valid.nonzero().tolist():
        rows, cols = grid[s, e].tolist()
        member = segment[s] == e
        image = tokens.new_zeros(rows, cols, tokens.shape[-1])
        rc = coords[s][member]
        image[rc[:, 0], rc[:, 1]] = tokens[s][member]
        out.append(image)
    return out
