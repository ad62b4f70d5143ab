"""Dataclass configs, loaded from YAML and overridden with `key.sub=value` on the command line.

An unknown key, a value of the wrong type or a value out of range is an error that names the
key, so a typo in a 500-GPU launch fails in the first second instead of silently training the
default. Each list of choices is written once, here, as a `Literal` type: the value is checked
against it when it is read, and the modules that act on it import it from here.
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from navit_clip.config_load import (CONFIG_DIR, REPO_ROOT, ConfigError, config_from_dict,  # noqa: F401
                                    config_to_dict, parse_overrides, read_yaml_file, resolve_path)
from navit_clip.config_load import keys_set as _keys_set, merge as _merge, preset_named as _preset_named, vision_preset

# The `reference` attention is a test oracle (model/attention.py), not a choice for training.
AttentionBackend = Literal["auto", "sdpa_bucketed", "sdpa_per_image", "sdpa", "flex", "flash"]
PosembKind = Literal["learned", "sinusoidal", "fourier", "learned_2d"]
PosembCoords = Literal["absolute", "fractional"]  # patch index | index / side
PosembCombine = Literal["sum", "stack", "product"]  # of the row and column embeddings
Pooling = Literal["map", "mean"]  # map: attention pooling
TextPooling = Literal["last", "mean"]  # last: the end token (the last non-padding token)
LossKind = Literal["softmax", "sigmoid"]
ResolutionMode = Literal["native", "sampled", "side_uniform", "side_normal", "square"]  # docs/data.md
SquareFit = Literal["crop", "squash"]  # square mode: shorter side to R then centre crop | resize to R×R
DropKind = Literal["none", "constant", "beta", "resolution"]
ShardKind = Literal["auto", "raw", "packed"]  # packed: written by `navit-clip pack-shards`
Precision = Literal["fp32", "bf16"]
TemplateSet = Literal["dataset", "imagenet"]
TokenizerModel = Literal["unigram", "bpe"]  # `navit-clip train-tokenizer --model-type`

ATTENTION_BACKENDS: tuple[str, ...] = typing.get_args(AttentionBackend)
POSEMB_KINDS: tuple[str, ...] = typing.get_args(PosembKind)
POSEMB_COORDS: tuple[str, ...] = typing.get_args(PosembCoords)
POSEMB_COMBINES: tuple[str, ...] = typing.get_args(PosembCombine)
POOLINGS: tuple[str, ...] = typing.get_args(Pooling)
TEXT_POOLINGS: tuple[str, ...] = typing.get_args(TextPooling)
LOSS_KINDS: tuple[str, ...] = typing.get_args(LossKind)
RESOLUTION_MODES: tuple[str, ...] = typing.get_args(ResolutionMode)
SQUARE_FITS: tuple[str, ...] = typing.get_args(SquareFit)
DROP_KINDS: tuple[str, ...] = typing.get_args(DropKind)
SHARD_KINDS: tuple[str, ...] = typing.get_args(ShardKind)
TEMPLATE_SETS: tuple[str, ...] = typing.get_args(TemplateSet)
TOKENIZER_MODELS: tuple[str, ...] = typing.get_args(TokenizerModel)


@dataclass
class VisionConfig:
    patch_size: int = 8
    channels: int = 3
    width: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    max_grid_side: int = 32  # rows and cols of the factorized position tables
    attention: AttentionBackend = "auto"  # docs/model.md
    posemb: PosembKind = "learned"
    posemb_coords: PosembCoords = "absolute"
    posemb_combine: PosembCombine = "sum"
    pooling: Pooling = "map"
    grad_checkpointing: bool = False  # recompute each block in backward: less memory, one more forward
    compile: bool = False  # torch.compile each block
    preset: str = ""  # e.g. B/16: size and patch from configs/models/vision_presets.yaml; set keys win


@dataclass
class TextConfig:
    tokenizer: str = "clip-bpe"  # or a SentencePiece model file (`navit-clip train-tokenizer`); docs/text.md
    vocab_size: int = 49408  # set from the tokenizer (open_clip's BPE: 49408)
    end_token_id: int = -1  # set from the tokenizer; -1: the last id, vocab_size - 1 (CLIP's BPE)
    context_length: int = 32
    width: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    grad_checkpointing: bool = False  # recompute each block in backward: less memory, one more forward
    causal: bool = True  # CLIP's causal tower; false: SigLIP-style, every token sees the whole caption
    pooling: TextPooling = "last"


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    embed_dim: int = 128
    init_logit_scale: float = math.log(10.0)
    max_logit_scale: float = math.log(100.0)
    loss: LossKind = "softmax"
    init_logit_bias: float = -10.0  # used by the sigmoid loss only
    loss_chunk_size: int = 1024  # text columns of logits held at once by the chunked loss


@dataclass
class ResolutionConfig:
    """data.resolution: how each image's size is chosen; the fields of data.resolution.ResolutionPolicy."""

    mode: ResolutionMode = "native"  # native: keep size, shrink to the budget; sampled: random budget
    max_tokens: int = 64  # token budget of one image
    min_tokens: int = 16  # lower end of a sampled budget
    side_mean: float = 0.5  # side_normal: mean side, as a fraction of [sqrt(min), sqrt(max)]
    side_std: float = 0.25  # side_normal: spread, same units
    ramp_start_tokens: int = 0  # > 0: the budget grows from this to max_tokens ...
    ramp_steps: int = 0  # ... over this many steps
    square_fit: SquareFit = "crop"  # square mode: how an image becomes R×R, R = patch size · sqrt(max_tokens)
    skip_blank_below: int = 0  # > 0: patches whose pixels span fewer grey levels are not tokens (docs/data.md)


@dataclass
class DropConfig:
    """data.drop: token dropping in training; the fields of data.dropping.DropPolicy."""

    kind: DropKind = "none"
    rate: float = 0.0  # constant rate, or the rate at resolution.max_tokens for `resolution`
    beta_a: float = 1.0
    beta_b: float = 1.0
    max_rate: float = 0.5  # beta: the drawn value is scaled to [0, max_rate]
    ramp_start: float = 1.0  # the rate is scaled from this at step 0 to 1 at ramp_steps
    ramp_steps: int = 0


@dataclass
class AugmentConfig:
    """data.augment: training crops at nearly the image's aspect ratio (data.augment.CropPolicy)."""

    min_area: float = 1.0  # smallest crop, as a fraction of the image's area
    max_aspect_change: float = 1.0  # the crop's aspect ratio is the image's times up to this, or divided by it


@dataclass
class PackingConfig:
    """data.packing: the streaming best-fit packer's arguments (data.exact_fill.make_packer)."""

    open_sequences: int = 8  # sequences kept open for best fit
    buffer_size: int = 64  # lookahead examples; 0 = place each on arrival
    exact_fill: bool = False  # shrink one image of a sequence when that removes its padding (needs buffer_size > 0)


@dataclass
class SourcesConfig:
    """data.sources: how the shards are drawn and read."""

    weights: str = ""  # "0.7,0.3": mix of the ";"-separated sources in train_shards
    resampled: bool = False  # draw shards with replacement, endless, no split by rank
    steps_per_epoch: int = 0  # resampled: batches per epoch on every rank (0 = one endless epoch)
    allow_pipe: bool = False  # allow `pipe:` shard URLs (they run shell commands)
    shard_kind: ShardKind = "auto"


@dataclass
class DataConfig:
    train_shards: str = "data/digits/train-{000000..000007}.tar"
    eval_shards: str = "data/digits/eval-{000000..000001}.tar"
    seq_len: int = 256  # L: tokens per packed sequence
    max_images: int = 16  # E_max: images per sequence
    sequences_per_batch: int = 4  # S: sequences per rank and step
    shuffle_buffer: int = 256
    num_workers: int = 1
    max_image_pixels: int = 64_000_000  # larger images are skipped as suspicious
    resolution: ResolutionConfig = field(default_factory=ResolutionConfig)
    drop: DropConfig = field(default_factory=DropConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    packing: PackingConfig = field(default_factory=PackingConfig)
    sources: SourcesConfig = field(default_factory=SourcesConfig)

    # Keys of earlier versions: reading one is an error that names its new path.
    moved_keys: ClassVar[dict[str, str]] = {
        "resolution": "resolution.mode", "max_tokens_per_image": "resolution.max_tokens",
        "min_tokens_per_image": "resolution.min_tokens", "side_mean": "resolution.side_mean",
        "side_std": "resolution.side_std", "resolution_ramp_start_tokens": "resolution.ramp_start_tokens",
        "resolution_ramp_steps": "resolution.ramp_steps", "drop": "drop.kind", "drop_rate": "drop.rate", "drop_beta_a": "drop.beta_a", "drop_beta_b": "drop.beta_b",
        "drop_max_rate": "drop.max_rate", "drop_ramp_start": "drop.ramp_start", "drop_ramp_steps": "drop.ramp_steps",
        "open_sequences": "packing.open_sequences", "pack_buffer": "packing.buffer_size",
        "source_weights": "sources.weights", "resampled": "sources.resampled",
        "steps_per_epoch": "sources.steps_per_epoch", "allow_pipe": "sources.allow_pipe",
        "shard_kind": "sources.shard_kind",
    }


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    warmup_steps: int = 50
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0


@dataclass
class TrainConfig:
    steps: int = 600
    seed: int = 0
    out_dir: str = "runs/default"
    log_every: int = 10
    ckpt_every: int = 200
    keep_checkpoints: int = 2
    deepspeed: str = "configs/deepspeed/cpu.json"
    precision: Precision = "fp32"
    resume: bool = True  # continue from the last complete checkpoint in out_dir if there is one
    extend: bool = False  # on resume, allow a train.steps other than the checkpoint's (the LR decay is stretched)
    grad_accum_steps: int = 1  # micro-batches (each data.sequences_per_batch per rank) per optimizer step
    peak_tflops: float = 0.0  # peak TFLOP/s of one device for the MFU estimate; 0 = do not report MFU


@dataclass
class EvalConfig:
    max_tokens_per_image: int = 0  # 0 = the training budget
    templates: TemplateSet = "dataset"
    sequences_per_batch: int = 8


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> "Config":
        """Ranges and relations between keys (choices are checked when read)."""
        v, t, d = self.model.vision, self.model.text, self.data
        r, p, drop = d.resolution, d.packing, d.drop
        checks = [
            ("model.vision.width", v.width % v.heads == 0, "must be divisible by model.vision.heads"),
            ("model.text.width", t.width % t.heads == 0, "must be divisible by model.text.heads"),
            ("model.vision.max_grid_side", v.max_grid_side >= 1, "must be >= 1"),
            ("model.loss_chunk_size", self.model.loss_chunk_size >= 1, "must be >= 1"),
            ("data.resolution.max_tokens", 1 <= r.max_tokens <= d.seq_len, "must be in [1, data.seq_len]"),
            ("data.resolution.min_tokens", 1 <= r.min_tokens <= r.max_tokens, "must be in [1, data.resolution.max_tokens]"),
            ("data.resolution.side_std", r.side_std > 0, "must be > 0"),
            ("data.resolution.skip_blank_below", 0 <= r.skip_blank_below <= 256, "must be in [0, 256]"),
            ("data.resolution.max_tokens", r.mode != "square" or math.isqrt(r.max_tokens) ** 2 == r.max_tokens,
             "must be a square number in data.resolution.mode=square (the image is sqrt(max_tokens) patches a side)"),
            ("data.max_images", d.max_images >= 1, "must be >= 1"),
            ("data.max_images", r.mode != "square" or d.max_images == 1,
             "must be 1 in data.resolution.mode=square (one image per sequence)"),
            ("data.sequences_per_batch", d.sequences_per_batch >= 1, "must be >= 1"),
            ("data.num_workers", d.num_workers >= 0, "must be >= 0"),
            ("data.packing.open_sequences", p.open_sequences >= 1, "must be >= 1"),
            ("data.packing.buffer_size", p.buffer_size >= 0, "must be >= 0"),
            ("data.packing.exact_fill", not p.exact_fill or p.buffer_size > 0, "needs data.packing.buffer_size > 0"),
            ("data.sources.steps_per_epoch", d.sources.steps_per_epoch >= 0, "must be >= 0"),
            ("data.drop.rate", 0.0 <= drop.rate < 1.0, "must be in [0, 1)"),
            ("data.drop.max_rate", 0.0 <= drop.max_rate < 1.0, "must be in [0, 1)"),
            ("data.drop.beta_a", drop.beta_a > 0, "must be > 0"),
            ("data.drop.beta_b", drop.beta_b > 0, "must be > 0"),
            ("data.augment.min_area", 0.0 < d.augment.min_area <= 1.0, "must be in (0, 1]"),
            ("data.augment.max_aspect_change", d.augment.max_aspect_change >= 1.0, "must be >= 1"),
            ("train.steps", self.train.steps >= 1, "must be >= 1"),
            ("train.ckpt_every", self.train.ckpt_every >= 1, "must be >= 1"),
            ("train.log_every", self.train.log_every >= 1, "must be >= 1"),
            ("train.keep_checkpoints", self.train.keep_checkpoints >= 1, "must be >= 1"),
            ("train.grad_accum_steps", self.train.grad_accum_steps >= 1, "must be >= 1"),
            ("train.peak_tflops", self.train.peak_tflops >= 0, "must be >= 0"),
            ("optim.lr", self.optim.lr > 0, "must be > 0"),
            ("eval.max_tokens_per_image", 0 <= self.eval.max_tokens_per_image <= d.seq_len,
             "must be in [0, data.seq_len]"),
        ]
        for key, ok, why in checks:
            if not ok:
                raise ConfigError(f"config key {key} {why}")
        return self


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply `key.sub=value` overrides to an existing config (e.g. one read from a run) and validate."""
    _merge(cfg, parse_overrides(overrides))
    return cfg.validate()


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- model.vision.preset <- YAML file <- overrides, then validated."""
    cfg = Config()
    layers = []
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        loaded = read_yaml_file(path) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at its top")
        layers.append(loaded)
    layers.append(parse_overrides(overrides or []))
    preset = _preset_named(layers)
    if preset:
        _merge(cfg.model.vision, vision_preset(preset), prefix="model.vision.")
    for layer in layers:
        _merge(cfg, layer)
    from navit_clip.data.text import apply_tokenizer  # reads the tokenizer's vocabulary

    apply_tokenizer(cfg.model.text, _keys_set(layers, "model.text"))
    return cfg.validate()
