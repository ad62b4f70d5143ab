"""Load saved weights into a module built from a saved config, and when the two disagree, say
which config key is wrong instead of listing every tensor.

Which key decides which tensor shape is not written down anywhere but in the model code, so it
is found by asking the model: the module is rebuilt on the meta device (no memory, no compute)
with each shape-bearing key changed in turn, and the keys whose changes touch the tensors that
disagree, and little else, are named.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

from navit_clip.errors import InputError

Shapes = dict[str, tuple[int, ...]]


def shapes_of(state: Mapping[str, torch.Tensor]) -> Shapes:
    return {name: tuple(tensor.shape) for name, tensor in state.items()}


def differing(expected: Shapes, found: Shapes) -> set[tuple[str, str]]:
    """(tensor name, "absent" or "shape") of each tensor missing from either side or shaped
    differently: a key that adds tensors (a depth) and one that reshapes them (a width) touch the
    same names in different ways."""
    return {(name, "absent" if name not in expected or name not in found else "shape")
            for name in expected.keys() | found.keys() if expected.get(name) != found.get(name)}


def _alternatives(value: Any, annotation: Any) -> list[Any]:
    """Other values a key could take that would change shapes if it were shape-bearing."""
    choices = typing.get_args(annotation) if typing.get_origin(annotation) is typing.Literal else ()
    if choices:
        return [c for c in choices if c != value]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return []
    if isinstance(value, int):
        return sorted({value * 2, max(1, value // 2), value + 1, max(1, value - 1)} - {value})
    return [value * 2, value / 2]


def config_keys(section: str, cls: type, values: Mapping[str, Any]) -> Iterator[tuple[str, Any, Any]]:
    """(dotted key, value, annotation) of every field of a config dataclass saved as `values`."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else None
        yield f"{section}.{f.name}", values.get(f.name, default), hints[f.name]


def _with(config: dict, key: str, value: Any) -> dict:
    changed = {k: dict(v) if isinstance(v, dict) else v for k, v in config.items()}
    *sections, last = key.split(".")
    target = changed
    for name in sections:
        target = target[name]
    target[last] = value
    return changed


def suspect_keys(build: Callable[[dict], nn.Module], config: dict, keys: list[tuple[str, Any, Any]],
                 found: Shapes) -> list[tuple[str, Any]]:
    """The config keys whose change best explains how `found` differs from what `config` builds,
    each with the value that makes the model match the weights exactly (None if no value tried
    does); empty if no key touches the tensors that differ."""
    with torch.device("meta"):
        base = shapes_of(build(config).state_dict())
        wrong = differing(base, found)
        best: dict[str, tuple[tuple[int, float], Any]] = {}
        for key, value, annotation in keys:
            for other in _alternatives(value, annotation):
                try:
                    shapes = shapes_of(build(_with(config, key, other)).state_dict())
                except Exception:  # noqa: BLE001 - a combination the model refuses tells nothing
                    continue
                touched = differing(base, shapes)
                if not touched & wrong:
                    continue
                fixed = sum(shapes.get(name) == found.get(name) for name, _ in wrong)
                score = (fixed, len(touched & wrong) / len(touched | wrong))
                if key not in best or score > best[key][0]:
                    best[key] = (score, None if differing(shapes, found) else other)
    top = max((score for score, _ in best.values()), default=None)
    return [(key, fits) for key, (score, fits) in best.items() if score == top]


def _shape(shape: tuple[int, ...] | None) -> str:
    return "absent" if shape is None else str(list(shape))


def load_matching(module: nn.Module, state: Mapping[str, torch.Tensor], *, build: Callable[[dict], nn.Module],
                  config: dict, keys: list[tuple[str, Any, Any]], config_file: str, weights_file: str) -> None:
    """module.load_state_dict(state, strict=True), with a one-line InputError naming
    `config_file`, the keys that disagree with `weights_file`, and one tensor as evidence."""
    expected, found = shapes_of(module.state_dict()), shapes_of(state)
    wrong = differing(expected, found)
    if wrong:
        values, source = {key: value for key, value, _ in keys}, Path(config_file).name
        named = " or ".join(f"{key} ({source}: {values[key]}" + ("" if fits is None else f", the weights fit {fits}")
                            + ")" for key, fits in suspect_keys(build, config, keys, found)) or "its model settings"
        example = min(name for name, _ in wrong)
        count = f"{len(wrong)} tensors differ" if len(wrong) > 1 else "1 tensor differs"
        raise InputError(f"{config_file} does not match the weights in {weights_file}: check {named}; {count}, "
                         f"e.g. {example} is {_shape(found.get(example))} in the weights but "
                         f"{_shape(expected.get(example))} for {source}")
    module.load_state_dict(state, strict=True)
