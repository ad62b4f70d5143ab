"""The description of one packed stream, and the one place it is built from the config.

The spec nests the domain objects the config's sub-sections describe, field for field:
`data.resolution` is the ResolutionPolicy, `data.drop` the DropPolicy, `data.packing` the
packer's arguments and `data.sources` how shards are drawn. Variants (evaluation, pre-packing)
are this spec with `dataclasses.replace`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from navit_clip.config import Config, PackingConfig, SourcesConfig
from navit_clip.data.augment import CropPolicy
from navit_clip.data.dropping import DropPolicy
from navit_clip.data.resolution import ResolutionPolicy, inference_policy


@dataclass(frozen=True)
class StreamSpec:
    """Everything one packed stream needs; built by `stream_spec`."""

    shards: str  # one shard spec, or several sources separated by ";"
    text_len: int
    tokenizer: str  # model.text.tokenizer: clip-bpe or a SentencePiece model file
    seq_len: int
    max_images: int
    sequences_per_batch: int
    resolution: ResolutionPolicy
    drop: DropPolicy
    packing: PackingConfig
    sources: SourcesConfig
    shuffle_buffer: int  # 0 = keep shard order (evaluation)
    loop: bool  # endless epochs (training) or a single pass (evaluation)
    seed: int
    max_image_pixels: int
    augment: CropPolicy = CropPolicy()  # training crops (off in evaluation)

    @property
    def patch_size(self) -> int:
        return self.resolution.patch_size


def stream_spec(cfg: Config) -> StreamSpec:
    """The training stream the config describes."""
    d, v = cfg.data, cfg.model.vision
    resolution = ResolutionPolicy(patch_size=v.patch_size, max_side=v.max_grid_side, **asdict(d.resolution))
    drop = DropPolicy(**asdict(d.drop), min_tokens=resolution.min_tokens, max_tokens=resolution.max_tokens)
    return StreamSpec(shards=d.train_shards, text_len=cfg.model.text.context_length,
                      tokenizer=cfg.model.text.tokenizer, seq_len=d.seq_len,
                      max_images=d.max_images, sequences_per_batch=d.sequences_per_batch, resolution=resolution,
                      drop=drop, packing=replace(d.packing), sources=replace(d.sources),
                      shuffle_buffer=d.shuffle_buffer, loop=True, seed=cfg.train.seed,
                      max_image_pixels=d.max_image_pixels, augment=CropPolicy(**asdict(d.augment)))


def evaluation_spec(cfg: Config, shards: str | None = None) -> StreamSpec:
    """One pass over evaluation shards in shard order: each image sized as `inference_policy` says
    at the training budget (never shrunk to fill a sequence), nothing dropped,
    `eval.sequences_per_batch` sequences per batch."""
    spec = stream_spec(cfg)
    return replace(spec, shards=shards or cfg.data.eval_shards, sequences_per_batch=cfg.eval.sequences_per_batch,
                   resolution=inference_policy(spec.resolution), drop=DropPolicy(), augment=CropPolicy(),
                   packing=replace(spec.packing, exact_fill=False), sources=replace(spec.sources, resampled=False),
                   shuffle_buffer=0, loop=False)
