"""YAML configs for dataclasses, overridable from the command line with ``--key value``."""
from __future__ import annotations

import copy
import dataclasses
import os
import typing
from fractions import Fraction
from pathlib import Path
from typing import List, Type, TypeVar

import yaml

from par.errors import ParError

T = TypeVar("T")


def load_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ParError(f"config not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ParError(f"cannot parse config {path}: {e}") from None
    if not isinstance(data, dict):
        raise ParError(f"config {path} must be a mapping of keys to values")
    return data


def parse_overrides(args: List[str]) -> dict:
    """``["--lr", "0.001", "--steps=5"]`` -> ``{"lr": 0.001, "steps": 5}`` (values parsed as YAML; YAML
    leaves ``1e-3`` a string, which ``build`` then coerces by the field's type)."""
    out, i = {}, 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or arg == "--":
            raise ParError(f"expected --key value, got {arg!r}")
        key = arg[2:]
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ParError(f"option --{key} needs a value")
            value = args[i + 1]
            i += 2
        out[key.replace("-", "_")] = yaml.safe_load(value) if value != "" else None
    return out


def merge(values: dict, overrides: dict) -> dict:
    """``values`` with ``overrides`` applied; a dotted key ``objective_params.tau`` sets ``tau`` inside
    the mapping ``objective_params`` (created when missing). ``values`` is left unchanged."""
    out = copy.deepcopy(values)
    for key, value in overrides.items():
        *parents, last = key.split(".")
        target = out
        for i, part in enumerate(parents):
            if target.get(part) is None:
                target[part] = {}
            if not isinstance(target[part], dict):
                raise ParError(f"cannot set {key!r}: {'.'.join(parents[:i + 1])!r} is not a mapping")
            target = target[part]
        target[last] = value
    return out


def _coerce(value, hint, key: str, source: str):
    """``value`` as type ``hint``: YAML reads ``2e-4`` as a string, and ``--steps 5`` must be an int."""
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if value is None:
        if origin is typing.Union and type(None) in typing.get_args(hint):
            return None
        raise ParError(f"{source} key {key!r} may not be empty")
    if origin is typing.Union:
        return _coerce(value, args[0], key, source) if len(args) == 1 else value
    try:
        if hint is float and not isinstance(value, bool):
            if isinstance(value, str) and "/" in value:  # a fraction, as the field writes eps: 4/255
                return float(Fraction(value.strip()))
            return float(value)
        if hint is int and not isinstance(value, bool) and float(value) == int(float(value)):
            return int(float(value))
        if hint is bool and isinstance(value, bool):
            return value
        if hint is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        if origin in (list, tuple) and isinstance(value, (list, tuple)):
            return [_coerce(v, args[0], key, source) for v in value] if args else list(value)
        if (hint is dict or origin is dict) and isinstance(value, dict):
            if len(args) == 2 and args[1] in (int, float, str, bool):  # poison_rates: {badclip: 1e-2}
                return {k: _coerce(v, args[1], f"{key}.{k}", source) for k, v in value.items()}
            return value
    except (TypeError, ValueError, ZeroDivisionError, OverflowError):  # OverflowError: int(inf)
        pass
    name = getattr(hint, "__name__", str(hint))
    raise ParError(f"{source} key {key!r} must be {name}, got {value!r}")


def build(cls: Type[T], values: dict, source: str = "config") -> T:
    """``cls(**values)`` with types checked and an error that names unknown and missing keys."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ParError(f"unknown {source} key(s) {unknown}; known keys: {sorted(names)}")
    required = [
        f.name for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in values
    ]
    if required:
        raise ParError(f"{source} lacks required key(s) {required}")
    hints = typing.get_type_hints(cls)
    return cls(**{k: _coerce(v, hints[k], k, source) for k, v in values.items()})


def dump(obj) -> str:
    return yaml.safe_dump(dataclasses.asdict(obj), sort_keys=False)
