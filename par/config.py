"""YAML configs for dataclasses, overridable from the command line with ``--key value``."""
from __future__ import annotations

import dataclasses
import os
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
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ParError(f"cannot parse config {path}: {e}") from None
    if not isinstance(data, dict):
        raise ParError(f"config {path} must be a mapping of keys to values")
    return data


def parse_overrides(args: List[str]) -> dict:
    """``["--lr", "1e-3", "--steps=5"]`` -> ``{"lr": 0.001, "steps": 5}`` (values parsed as YAML)."""
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


def build(cls: Type[T], values: dict, source: str = "config") -> T:
    """``cls(**values)`` with an error that names unknown and missing keys."""
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
    return cls(**values)


def dump(obj) -> str:
    return yaml.safe_dump(dataclasses.asdict(obj), sort_keys=False)
