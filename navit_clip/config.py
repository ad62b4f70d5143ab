"""Dataclass configs, loaded from YAML and overridden with `key.sub=value` on the command line.

An unknown key, a value of the wrong type or a value out of range is an error that names the
key, so a typo in a 500-GPU launch fails in the first second instead of silently training the
default.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from navit_clip.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[1]
# An installed wheel carries the configs inside the package (pyproject maps configs/ there); a
# checkout, editable or not, reads them from configs/ at the top of the repository.
_PACKAGED_CONFIGS = Path(__file__).resolve().parent / "configs"
CONFIG_DIR = _PACKAGED_CONFIGS if _PACKAGED_CONFIGS.is_dir() else REPO_ROOT / "configs"


class ConfigError(UserError, ValueError):
    """A config key is unknown, mistyped or out of range."""


ATTENTION_BACKENDS = ("auto", "sdpa_per_image", "sdpa", "flex", "flash", "reference")
POSEMB_KINDS = ("learned", "sinusoidal", "fourier", "learned_2d")
VISION_PRESETS_FILE = CONFIG_DIR / "models" / "vision_presets.yaml"


@dataclass
class VisionConfig:
    patch_size: int = 8
    channels: int = 3
    width: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    max_grid_side: int = 32  # rows and cols of the factorized position tables
    attention: str = "auto"  # auto | sdpa_per_image | sdpa | flex | flash | reference (docs/model.md)
    posemb: str = "learned"  # learned | sinusoidal | fourier | learned_2d
    posemb_coords: str = "absolute"  # absolute (patch index) | fractional (index / side)
    posemb_combine: str = "sum"  # sum | stack | product of the row and column embeddings
    pooling: str = "map"  # map (attention pooling) | mean
    grad_checkpointing: bool = False  # recompute each block in backward: less memory, one more forward
    compile: bool = False  # torch.compile each block
    preset: str = ""  # e.g. B/16: size and patch from configs/models/vision_presets.yaml; set keys win


@dataclass
class TextConfig:
    vocab_size: int = 49408  # open_clip's BPE vocabulary
    context_length: int = 32
    width: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    grad_checkpointing: bool = False  # recompute each block in backward: less memory, one more forward


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    embed_dim: int = 128
    init_logit_scale: float = math.log(10.0)
    max_logit_scale: float = math.log(100.0)
    loss: str = "softmax"  # softmax | sigmoid
    init_logit_bias: float = -10.0  # used by the sigmoid loss only
    loss_chunk_size: int = 1024  # text columns of logits held at once by the chunked loss


@dataclass
class DataConfig:
    train_shards: str = "data/digits/train-{000000..000007}.tar"
    eval_shards: str = "data/digits/eval-{000000..000001}.tar"
    seq_len: int = 256  # L: tokens per packed sequence
    max_images: int = 16  # E_max: images per sequence
    sequences_per_batch: int = 4  # S: sequences per rank and step
    resolution: str = "native"  # native: keep size, shrink to the budget; sampled: random budget
    max_tokens_per_image: int = 64
    min_tokens_per_image: int = 16  # lower end of the sampled budget
    open_sequences: int = 8  # sequences the streaming packer keeps open for best fit
    shuffle_buffer: int = 256
    num_workers: int = 1
    max_image_pixels: int = 64_000_000  # larger images are skipped as suspicious
    pack_buffer: int = 64  # lookahead examples of the best-fit packer; 0 = place each on arrival
    source_weights: str = ""  # "0.7,0.3": mix of the ";"-separated sources in train_shards
    resampled: bool = False  # draw shards with replacement, endless, no split by rank
    steps_per_epoch: int = 0  # resampled: batches per epoch on every rank (0 = one endless epoch)
    allow_pipe: bool = False  # allow `pipe:` shard URLs (they run shell commands)
    shard_kind: str = "auto"  # auto | raw | packed (pre-packed by `navit-clip pack-shards`)
    side_mean: float = 0.5  # side_normal resolution: mean side, as a fraction of [min, max]
    side_std: float = 0.25  # side_normal resolution: spread, same units
    resolution_ramp_start_tokens: int = 0  # > 0: the budget grows from this to max_tokens_per_image
    resolution_ramp_steps: int = 0  # ... over this many steps
    drop: str = "none"  # token dropping: none | constant | beta | resolution (training only)
    drop_rate: float = 0.0  # constant rate, or the rate at max_tokens_per_image for `resolution`
    drop_beta_a: float = 1.0
    drop_beta_b: float = 1.0
    drop_max_rate: float = 0.5  # beta: the drawn value is scaled to [0, drop_max_rate]
    drop_ramp_start: float = 1.0  # the rate is scaled from this at step 0 to 1 at drop_ramp_steps
    drop_ramp_steps: int = 0


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
    precision: str = "fp32"  # fp32 | bf16
    resume: bool = True  # continue from the last complete checkpoint in out_dir if there is one
    grad_accum_steps: int = 1  # micro-batches (each data.sequences_per_batch per rank) per optimizer step
    peak_tflops: float = 0.0  # peak TFLOP/s of one device for the MFU estimate; 0 = do not report MFU


@dataclass
class EvalConfig:
    max_tokens_per_image: int = 0  # 0 = the training budget
    templates: str = "dataset"  # dataset | imagenet
    sequences_per_batch: int = 8


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> "Config":
        v, t, d = self.model.vision, self.model.text, self.data
        checks = [
            ("model.vision.width", v.width % v.heads == 0, "must be divisible by model.vision.heads"),
            ("model.text.width", t.width % t.heads == 0, "must be divisible by model.text.heads"),
            ("model.vision.attention", v.attention in ATTENTION_BACKENDS, f"must be one of {', '.join(ATTENTION_BACKENDS)}"),
            ("model.vision.posemb", v.posemb in POSEMB_KINDS, f"must be one of {', '.join(POSEMB_KINDS)}"),
            ("model.vision.posemb_coords", v.posemb_coords in {"absolute", "fractional"}, "must be absolute or fractional"),
            ("model.vision.posemb_combine", v.posemb_combine in {"sum", "stack", "product"},
             "must be sum, stack or product"),
            ("model.vision.pooling", v.pooling in {"map", "mean"}, "must be map or mean"),
            ("model.vision.max_grid_side", v.max_grid_side >= 1, "must be >= 1"),
            ("model.loss", self.model.loss in {"softmax", "sigmoid"}, "must be softmax or sigmoid"),
            ("model.loss_chunk_size", self.model.loss_chunk_size >= 1, "must be >= 1"),
            ("data.resolution", d.resolution in {"native", "sampled", "side_uniform", "side_normal"},
             "must be native, sampled, side_uniform or side_normal"),
            ("data.max_tokens_per_image", 1 <= d.max_tokens_per_image <= d.seq_len, "must be in [1, data.seq_len]"),
            ("data.min_tokens_per_image", 1 <= d.min_tokens_per_image <= d.max_tokens_per_image,
             "must be in [1, data.max_tokens_per_image]"),
            ("data.max_images", d.max_images >= 1, "must be >= 1"),
            ("data.sequences_per_batch", d.sequences_per_batch >= 1, "must be >= 1"),
            ("data.open_sequences", d.open_sequences >= 1, "must be >= 1"),
            ("data.num_workers", d.num_workers >= 0, "must be >= 0"),
            ("data.pack_buffer", d.pack_buffer >= 0, "must be >= 0"),
            ("data.steps_per_epoch", d.steps_per_epoch >= 0, "must be >= 0"),
            ("data.shard_kind", d.shard_kind in {"auto", "raw", "packed"}, "must be auto, raw or packed"),
            ("data.side_std", d.side_std > 0, "must be > 0"),
            ("data.drop", d.drop in {"none", "constant", "beta", "resolution"},
             "must be none, constant, beta or resolution"),
            ("data.drop_rate", 0.0 <= d.drop_rate < 1.0, "must be in [0, 1)"),
            ("data.drop_max_rate", 0.0 <= d.drop_max_rate < 1.0, "must be in [0, 1)"),
            ("data.drop_beta_a", d.drop_beta_a > 0, "must be > 0"),
            ("data.drop_beta_b", d.drop_beta_b > 0, "must be > 0"),
            ("train.steps", self.train.steps >= 1, "must be >= 1"),
            ("train.precision", self.train.precision in {"fp32", "bf16"}, "must be fp32 or bf16"),
            ("train.ckpt_every", self.train.ckpt_every >= 1, "must be >= 1"),
            ("train.log_every", self.train.log_every >= 1, "must be >= 1"),
            ("train.keep_checkpoints", self.train.keep_checkpoints >= 1, "must be >= 1"),
            ("optim.lr", self.optim.lr > 0, "must be > 0"),
            ("eval.templates", self.eval.templates in {"dataset", "imagenet"}, "must be dataset or imagenet"),
            ("eval.max_tokens_per_image", 0 <= self.eval.max_tokens_per_image <= d.seq_len,
             "must be in [0, data.seq_len]"),
            ("train.grad_accum_steps", self.train.grad_accum_steps >= 1, "must be >= 1"),
            ("train.peak_tflops", self.train.peak_tflops >= 0, "must be >= 0"),
        ]
        for key, ok, why in checks:
            if not ok:
                raise ConfigError(f"config key {key} {why}")
        return self


def _coerce(key: str, raw: Any, hint: Any) -> Any:
    """Turn a YAML or command-line value into the field's type, or raise naming the key."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return _coerce(key, raw, next(a for a in typing.get_args(hint) if a is not type(None)))
    try:
        if hint is bool:
            if isinstance(raw, bool):
                return raw
            if isinstance(raw, int) and raw in (0, 1):
                return bool(raw)
            if isinstance(raw, str) and raw.lower() in {"true", "false", "1", "0", "yes", "no"}:
                return raw.lower() in {"true", "1", "yes"}
            raise ValueError
        if hint is int:
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise ValueError
            return int(raw)
        if hint is float:
            if isinstance(raw, bool):
                raise ValueError
            return float(raw)
        if hint is str:
            if not isinstance(raw, (str, int, float)):
                raise ValueError
            return str(raw)
    except (TypeError, ValueError):
        pass
    else:
        raise ConfigError(f"config key {key} has a type navit-clip cannot read: {hint}")
    raise ConfigError(f"config key {key} must be {getattr(hint, '__name__', hint)}, got {raw!r}")


def _merge(obj: Any, values: dict[str, Any], prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for name, raw in values.items():
        key = f"{prefix}{name}"
        if name not in names:
            raise ConfigError(f"unknown config key {key} (known: {', '.join(sorted(names))})")
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(raw, dict):
                raise ConfigError(f"config key {key} is a section and needs a mapping, got {raw!r}")
            _merge(current, raw, prefix=f"{key}.")
        else:
            setattr(obj, name, _coerce(key, raw, hints[name]))


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`["optim.lr=3e-4", "train.steps=10"]` -> nested dict, values parsed as YAML scalars."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} sets a key inside a value")
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    return nested


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
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at its top")
        layers.append(loaded)
    layers.append(parse_overrides(overrides or []))
    preset = _preset_named(layers)
    if preset:
        _merge(cfg.model.vision, vision_preset(preset), prefix="model.vision.")
    for layer in layers:
        _merge(cfg, layer)
    return cfg.validate()


def vision_preset(name: str) -> dict[str, Any]:
    """The model.vision values of a named preset (Ti/16, B/16, So400m/14, ...): data in
    configs/models/vision_presets.yaml, so a size is added by editing YAML, not code."""
    table = yaml.safe_load(VISION_PRESETS_FILE.read_text())
    size, _, patch = name.partition("/")
    sizes = {k.lower(): v for k, v in table["sizes"].items()}
    if size.lower() not in sizes or not patch.isdigit() or int(patch) not in table["patch_sizes"]:
        raise ConfigError(f"config key model.vision.preset={name!r} is not a preset (sizes: "
                          f"{', '.join(table['sizes'])}; patch sizes: {', '.join(map(str, table['patch_sizes']))}; "
                          f"e.g. B/16)")
    return {**sizes[size.lower()], "patch_size": int(patch)}


def _preset_named(layers: list[dict[str, Any]]) -> str:
    name = ""
    for layer in layers:
        vision = (layer.get("model") or {}).get("vision") if isinstance(layer.get("model"), dict) else None
        if isinstance(vision, dict) and "preset" in vision:
            name = str(vision["preset"] or "")
    return name


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_from_dict(cls: type, values: dict[str, Any]) -> Any:
    """Rebuild a (nested) dataclass from `config_to_dict` output, strictly."""
    obj = cls()
    _merge(obj, values)
    return obj


def resolve_path(path: str | Path) -> Path:
    """Relative paths in configs are taken from the working directory, then from where the shipped
    `configs/` lies (the repository, or the installed package), so `configs/deepspeed/cpu.json`
    works from any directory."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    shipped = CONFIG_DIR.parent / p
    return shipped if shipped.exists() else p
