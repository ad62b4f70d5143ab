"""Reading config values: YAML and `key.sub=value` overrides merged into the dataclasses of
`navit_clip.config`, each value turned into its field's type (a `Literal` field accepts only
its listed choices) or refused with an error that names the key.

Generic over the dataclasses, so it knows no field by name (it also knows where the shipped
configs lie); `navit_clip.config` re-exports it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from navit_clip.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[1]
# An installed wheel carries the configs inside the package (pyproject maps configs/ there); a
# checkout, editable or not, reads them from configs/ at the top of the repository.
_PACKAGED_CONFIGS = Path(__file__).resolve().parent / "configs"
CONFIG_DIR = _PACKAGED_CONFIGS if _PACKAGED_CONFIGS.is_dir() else REPO_ROOT / "configs"
VISION_PRESETS_FILE = CONFIG_DIR / "models" / "vision_presets.yaml"


class ConfigError(UserError, ValueError):
    """A config key is unknown, mistyped or out of range."""


def _coerce_choice(key: str, raw: Any, hint: Any) -> str:
    allowed = typing.get_args(hint)
    value = _coerce(key, raw, str)
    if value not in allowed:
        raise ConfigError(f"config key {key} must be one of {', '.join(allowed)}, got {raw!r}")
    return value


def _coerce(key: str, raw: Any, hint: Any) -> Any:
    """Turn a YAML or command-line value into the field's type, or raise naming the key."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return _coerce(key, raw, next(a for a in typing.get_args(hint) if a is not type(None)))
    if origin is typing.Literal:
        return _coerce_choice(key, raw, hint)
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


def moved_to(obj: Any, name: str, raw: Any) -> str | None:
    """The new path (relative to `obj`) of a key that moved, from the class's `moved_keys` table;
    a key that is now a section moved only when it is given a plain value."""
    new = getattr(type(obj), "moved_keys", {}).get(name)
    if new is None or (dataclasses.is_dataclass(getattr(obj, name, None)) and isinstance(raw, dict)):
        return None
    return new


def _set_path(obj: Any, path: str, raw: Any, prefix: str) -> None:
    *sections, name = path.split(".")
    for section in sections:
        obj, prefix = getattr(obj, section), f"{prefix}{section}."
    merge(obj, {name: raw}, prefix)


def merge(obj: Any, values: dict[str, Any], prefix: str = "", migrate: bool = False) -> None:
    """Set `values` on the dataclass `obj`. A moved key is an error naming its new path, or with
    `migrate` (configs saved by earlier runs) is set at that path."""
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for name, raw in values.items():
        key = f"{prefix}{name}"
        new = moved_to(obj, name, raw)
        if new is not None:
            if not migrate:
                raise ConfigError(f"config key {key} moved to {prefix}{new}")
            _set_path(obj, new, raw, prefix)
            continue
        if name not in names:
            raise ConfigError(f"unknown config key {key} (known: {', '.join(sorted(names))})")
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(raw, dict):
                raise ConfigError(f"config key {key} is a section and needs a mapping, got {raw!r}")
            merge(current, raw, f"{key}.", migrate)
        else:
            setattr(obj, name, _coerce(key, raw, hints[name]))


def yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's complaint on one line, with the line and column it points at (1-based)."""
    mark = getattr(exc, "problem_mark", None)
    problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
    context = getattr(exc, "context", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{problem}" + (f" ({' '.join(context.split())})" if context else "")


def read_yaml_file(path: Path) -> Any:
    """A YAML file's contents; unreadable text or a syntax error is a ConfigError naming the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {yaml_problem(exc)}") from None


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
        try:
            node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: the value is not valid YAML: {yaml_problem(exc)}") from None
    return nested


def preset_named(layers: list[dict[str, Any]]) -> str:
    name = ""
    for layer in layers:
        vision = (layer.get("model") or {}).get("vision") if isinstance(layer.get("model"), dict) else None
        if isinstance(vision, dict) and "preset" in vision:
            name = str(vision["preset"] or "")
    return name


def keys_set(layers: list[dict[str, Any]], section: str) -> dict[str, Any]:
    """The keys of `section` (e.g. "model.text") that the layers set, with the last value set."""
    found: dict[str, Any] = {}
    for layer in layers:
        node: Any = layer
        for part in section.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        found.update(node if isinstance(node, dict) else {})
    return found


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_from_dict(cls: type, values: dict[str, Any]) -> Any:
    """Rebuild a (nested) dataclass from `config_to_dict` output, strictly; keys that have moved
    since the dict was saved are read at their new paths, so earlier runs still load."""
    obj = cls()
    merge(obj, values, migrate=True)
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
