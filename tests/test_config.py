"""Config system: defaults, YAML, command-line overrides, strict errors that name the key."""

from __future__ import annotations

import dataclasses
import math

import pytest
import yaml

from navit_clip.config import (
    CONFIG_DIR,
    Config,
    ConfigError,
    config_from_dict,
    config_to_dict,
    load_config,
    parse_overrides,
)


def test_defaults_validate():
    cfg = Config()
    assert cfg.validate() is cfg
    assert load_config() == Config()


def test_yaml_load(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "model:\n  vision: {patch_size: 16, width: 96, heads: 3}\n  loss: sigmoid\n"
        "data:\n  seq_len: 512\n  resolution: {mode: sampled}\n"
        "optim: {lr: 2.0e-4}\n"
        "train: {resume: false, out_dir: runs/x}\n"
    )
    cfg = load_config(path)
    assert cfg.model.vision.patch_size == 16
    assert cfg.model.vision.width == 96 and cfg.model.vision.heads == 3
    assert cfg.model.loss == "sigmoid"
    assert cfg.data.seq_len == 512 and cfg.data.resolution.mode == "sampled"
    assert cfg.optim.lr == pytest.approx(2e-4)
    assert cfg.train.resume is False and cfg.train.out_dir == "runs/x"
    # untouched values keep their defaults
    assert cfg.model.vision.depth == Config().model.vision.depth
    assert cfg.data.max_images == Config().data.max_images


def test_empty_yaml_is_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_config(path) == Config()


def test_yaml_then_overrides_win(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optim: {lr: 2.0e-4}\ntrain: {steps: 7}\n")
    cfg = load_config(path, ["optim.lr=5e-4"])
    assert cfg.optim.lr == pytest.approx(5e-4)
    assert cfg.train.steps == 7


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(path)


def test_override_lr_exponent_without_dot():
    # YAML 1.1 reads "3e-4" as a string; it must still become the float 3e-4
    cfg = load_config(overrides=["optim.lr=3e-4"])
    assert isinstance(cfg.optim.lr, float)
    assert cfg.optim.lr == pytest.approx(3e-4)


def test_override_nested():
    cfg = load_config(overrides=["model.vision.patch_size=14", "model.text.context_length=77",
                                 "data.train_shards=/x/a-{000..009}.tar"])
    assert cfg.model.vision.patch_size == 14
    assert cfg.model.text.context_length == 77
    assert cfg.data.train_shards == "/x/a-{000..009}.tar"


def test_parse_overrides_nests():
    assert parse_overrides(["a.b.c=1", "a.b.d=x", "e=true"]) == {"a": {"b": {"c": 1, "d": "x"}}, "e": True}
    with pytest.raises(ConfigError, match="key.sub=value"):
        parse_overrides(["optim.lr"])
    with pytest.raises(ConfigError):
        parse_overrides(["optim.lr=1", "optim.lr.x=2"])


@pytest.mark.parametrize("raw, expected", [
    ("true", True), ("false", False), ("True", True), ("yes", True), ("no", False),
    ("'true'", True), ("'FALSE'", False), ("'1'", True), ("'0'", False),  # quoted: reach the str branch
])
def test_bool_coercion(raw, expected):
    cfg = load_config(overrides=[f"train.resume={raw}"])
    assert cfg.train.resume is expected


@pytest.mark.parametrize("raw, expected", [("1", True), ("0", False)])
def test_bool_coercion_from_bare_digits(raw, expected):
    cfg = load_config(overrides=[f"train.resume={raw}"])
    assert cfg.train.resume is expected


@pytest.mark.parametrize("raw", ["maybe", "2", "1.0"])
def test_bool_rejects(raw):
    with pytest.raises(ConfigError, match="train.resume"):
        load_config(overrides=[f"train.resume={raw}"])


def test_int_and_float_coercion():
    cfg = load_config(overrides=["train.steps=10", "optim.lr=1", "optim.grad_clip=2.5", "train.seed=3.0",
                                 "data.train_shards=5"])
    assert cfg.train.steps == 10 and type(cfg.train.steps) is int
    assert cfg.optim.lr == 1.0 and type(cfg.optim.lr) is float
    assert cfg.optim.grad_clip == 2.5
    assert cfg.train.seed == 3 and type(cfg.train.seed) is int
    assert cfg.data.train_shards == "5" and type(cfg.data.train_shards) is str


@pytest.mark.parametrize("override, key", [
    ("train.steps=1.5", "train.steps"),
    ("train.steps=true", "train.steps"),  # a bool is not an int
    ("train.steps=ten", "train.steps"),
    ("optim.lr=fast", "optim.lr"),
    ("optim.lr=false", "optim.lr"),
    ("model.vision.patch_size=[8, 8]", "model.vision.patch_size"),
    ("data.train_shards=[a, b]", "data.train_shards"),
    ("model.vision.patch_size.x=3", "model.vision.patch_size"),
])
def test_wrong_type_names_key(override, key):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[override])
    assert key in str(info.value)


@pytest.mark.parametrize("override, full_key", [
    ("optim.lrr=1e-3", "optim.lrr"),
    ("model.vision.widht=64", "model.vision.widht"),
    ("model.text.foo.bar=1", "model.text.foo"),
    ("nosuchsection.x=1", "nosuchsection"),
])
def test_unknown_key_names_full_dotted_key(override, full_key):
    with pytest.raises(ConfigError, match="unknown config key") as info:
        load_config(overrides=[override])
    assert f"key {full_key} " in str(info.value)


def test_unknown_key_in_yaml(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("data:\n  seq_lenn: 128\n")
    with pytest.raises(ConfigError, match="unknown config key data.seq_lenn"):
        load_config(path)


def test_section_needs_mapping():
    with pytest.raises(ConfigError, match="model.vision"):
        load_config(overrides=["model.vision=3"])


@pytest.mark.parametrize("overrides, key", [
    (["data.resolution.max_tokens=300", "data.seq_len=256"], "data.resolution.max_tokens"),
    (["data.resolution.max_tokens=0"], "data.resolution.max_tokens"),
    (["data.resolution.min_tokens=65", "data.resolution.max_tokens=64"], "data.resolution.min_tokens"),
    (["model.vision.width=130", "model.vision.heads=4"], "model.vision.width"),
    (["model.text.width=100", "model.text.heads=3"], "model.text.width"),
    (["data.resolution.mode=fixed"], "data.resolution.mode"),
    (["model.loss=hinge"], "model.loss"),
    (["model.vision.attention=xformers"], "model.vision.attention"),
    (["train.precision=fp16"], "train.precision"),
    (["eval.templates=coco"], "eval.templates"),
    (["eval.max_tokens_per_image=1000"], "eval.max_tokens_per_image"),
    (["optim.lr=0"], "optim.lr"),
    (["optim.lr=-1e-3"], "optim.lr"),
    (["train.steps=0"], "train.steps"),
    (["data.max_images=0"], "data.max_images"),
    (["data.sequences_per_batch=0"], "data.sequences_per_batch"),
    (["data.packing.open_sequences=0"], "data.packing.open_sequences"),
    (["data.num_workers=-1"], "data.num_workers"),
    (["train.ckpt_every=0"], "train.ckpt_every"),
    (["train.keep_checkpoints=0"], "train.keep_checkpoints"),
])
def test_out_of_range_names_key(overrides, key):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=overrides)
    assert f"config key {key} " in str(info.value)


def test_boundary_values_are_accepted():
    cfg = load_config(overrides=["data.seq_len=64", "data.resolution.max_tokens=64", "data.resolution.min_tokens=64",
                                 "eval.max_tokens_per_image=64", "data.num_workers=0"])
    assert cfg.data.resolution.max_tokens == cfg.data.seq_len == 64


def test_out_of_range_in_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  vision: {width: 100, heads: 8}\n")
    with pytest.raises(ConfigError, match="model.vision.width"):
        load_config(path)


def test_dict_round_trip():
    cfg = load_config(overrides=["optim.lr=3e-4", "model.vision.patch_size=16", "train.resume=false",
                                 "data.resolution.mode=sampled"])
    as_dict = config_to_dict(cfg)
    assert as_dict["optim"]["lr"] == pytest.approx(3e-4)
    assert as_dict["model"]["vision"]["patch_size"] == 16
    back = config_from_dict(Config, as_dict)
    assert back == cfg
    assert back is not cfg and back.model.vision is not cfg.model.vision
    # sub-config round trip too
    assert config_from_dict(type(cfg.model), config_to_dict(cfg.model)) == cfg.model


def test_dict_round_trip_through_yaml(tmp_path):
    cfg = load_config(overrides=["optim.lr=3e-4", "model.init_logit_scale=1.5", "train.out_dir=runs/rt"])
    path = tmp_path / "dumped.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(cfg)))
    assert load_config(path) == cfg


def test_from_dict_is_strict():
    values = config_to_dict(Config())
    values["data"]["bogus"] = 1
    with pytest.raises(ConfigError, match="data.bogus"):
        config_from_dict(Config, values)
    values = config_to_dict(Config())
    values["train"]["steps"] = "many"
    with pytest.raises(ConfigError, match="train.steps"):
        config_from_dict(Config, values)


def test_defaults_are_independent_instances():
    a, b = Config(), Config()
    a.model.vision.width = 64
    assert b.model.vision.width == 128


def test_repo_default_yaml_loads():
    path = CONFIG_DIR / "default.yaml"
    assert path.exists()
    cfg = load_config(path)
    raw = yaml.safe_load(path.read_text())
    # every value in the file made it into the config
    def check(obj, values, prefix=""):
        for name, value in values.items():
            current = getattr(obj, name)
            if dataclasses.is_dataclass(current):
                check(current, value, f"{prefix}{name}.")
            elif isinstance(current, float):
                assert math.isclose(current, float(value)), f"{prefix}{name}"
            else:
                assert current == value, f"{prefix}{name}"
    check(cfg, raw)
    assert cfg.data.sequences_per_batch == raw["data"]["sequences_per_batch"]


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_repo_yaml_loads(path):
    load_config(path)


def test_apply_overrides_to_existing_config():
    from navit_clip.config import apply_overrides

    cfg = load_config(overrides=["train.steps=5"])
    out = apply_overrides(cfg, ["optim.lr=3e-4", "model.vision.depth=2"])
    assert out.train.steps == 5 and out.optim.lr == pytest.approx(3e-4) and out.model.vision.depth == 2
    with pytest.raises(ConfigError, match="optim.lrr"):
        apply_overrides(Config(), ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="data.resolution.max_tokens"):
        apply_overrides(Config(), ["data.resolution.max_tokens=10000"])


# ---------------------------------------------------------------------------------------------
# moved keys and choice lists
# ---------------------------------------------------------------------------------------------

#: the flat data keys of earlier versions and where they live now (written out again here, as
#: the reference the table in config.py is checked against)
OLD_DATA_KEYS = {
    "resolution": "resolution.mode", "max_tokens_per_image": "resolution.max_tokens",
    "min_tokens_per_image": "resolution.min_tokens", "side_mean": "resolution.side_mean",
    "side_std": "resolution.side_std", "resolution_ramp_start_tokens": "resolution.ramp_start_tokens",
    "resolution_ramp_steps": "resolution.ramp_steps", "drop": "drop.kind", "drop_rate": "drop.rate",
    "drop_beta_a": "drop.beta_a", "drop_beta_b": "drop.beta_b", "drop_max_rate": "drop.max_rate",
    "drop_ramp_start": "drop.ramp_start", "drop_ramp_steps": "drop.ramp_steps",
    "open_sequences": "packing.open_sequences", "pack_buffer": "packing.buffer_size",
    "source_weights": "sources.weights", "resampled": "sources.resampled", "steps_per_epoch": "sources.steps_per_epoch",
    "allow_pipe": "sources.allow_pipe", "shard_kind": "sources.shard_kind",
}
#: a value of the old key that differs from the new key's default
OLD_VALUES = {"resolution": "sampled", "max_tokens_per_image": 32, "min_tokens_per_image": 8, "side_mean": 0.3,
              "side_std": 0.2, "resolution_ramp_start_tokens": 4, "resolution_ramp_steps": 10, "drop": "beta",
              "drop_rate": 0.2, "drop_beta_a": 2.0, "drop_beta_b": 3.0, "drop_max_rate": 0.4, "drop_ramp_start": 0.5,
              "drop_ramp_steps": 7, "open_sequences": 3, "pack_buffer": 5, "source_weights": "1,2",
              "resampled": True, "steps_per_epoch": 9, "allow_pipe": True, "shard_kind": "raw"}


def resolve(cfg: Config, path: str):
    for part in path.split("."):
        cfg = getattr(cfg, part)
    return cfg


@pytest.mark.parametrize("old", sorted(OLD_DATA_KEYS))
def test_moved_key_names_its_new_path(old, tmp_path):
    message = f"config key data.{old} moved to data.{OLD_DATA_KEYS[old]}"
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(None, [f"data.{old}={OLD_VALUES[old]}"])
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump({"data": {old: OLD_VALUES[old]}}))
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(path)
    # the new path takes the value
    assert resolve(load_config(None, [f"data.{OLD_DATA_KEYS[old]}={OLD_VALUES[old]}"]).data, OLD_DATA_KEYS[old]) \
        == OLD_VALUES[old]


def test_moved_keys_table_is_complete():
    from navit_clip.config import DataConfig

    assert DataConfig.moved_keys == OLD_DATA_KEYS


def test_config_saved_by_an_earlier_version_still_loads():
    """Runs saved before the data keys moved (checkpoints, config.json) read them at the new paths."""
    old = config_to_dict(Config())
    for section in ("resolution", "drop", "packing", "sources"):
        del old["data"][section]
    old["data"].update(OLD_VALUES)
    cfg = config_from_dict(Config, old).validate()
    for name, new in OLD_DATA_KEYS.items():
        assert resolve(cfg.data, new) == OLD_VALUES[name], new


def choice_fields(cls=Config, prefix=""):
    """(key, allowed values) of every field typed as a list of choices."""
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint, key = hints[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hint):
            yield from choice_fields(hint, f"{key}.")
        elif typing.get_origin(hint) is typing.Literal:
            yield key, typing.get_args(hint)


CHOICE_FIELDS = dict(choice_fields())


def test_every_choice_list_is_typed():
    assert set(CHOICE_FIELDS) == {
        "model.vision.attention", "model.vision.posemb", "model.vision.posemb_coords", "model.vision.posemb_combine",
        "model.vision.pooling", "model.text.pooling", "model.loss", "data.resolution.mode", "data.resolution.square_fit",
        "data.drop.kind", "data.sources.shard_kind", "train.precision", "eval.templates"}


# choices that need other keys set to match: square mode packs one image per sequence
CONSISTENT_WITH = {("data.resolution.mode", "square"): ["data.max_images=1"]}


@pytest.mark.parametrize("key", sorted(CHOICE_FIELDS))
def test_bad_choice_names_key_and_allowed_values(key):
    allowed = CHOICE_FIELDS[key]
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"{key}=nonsense"])
    assert str(info.value) == f"config key {key} must be one of {', '.join(allowed)}, got 'nonsense'"
    for value in allowed:  # and every listed choice is accepted
        assert resolve(load_config(None, [f"{key}={value}", *CONSISTENT_WITH.get((key, value), [])]), key) == value


def test_reference_attention_is_not_a_user_choice():
    """It is the plain oracle the tests check the other backends against, too slow to train with."""
    from navit_clip.model.attention import get_attend, reference_attend

    assert "reference" not in CHOICE_FIELDS["model.vision.attention"]
    with pytest.raises(ConfigError, match="model.vision.attention"):
        load_config(None, ["model.vision.attention=reference"])
    assert get_attend("reference").fn is reference_attend
