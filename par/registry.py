"""Name -> object registries for triggers, objectives, defenses and augmentations."""
from __future__ import annotations

import importlib
from typing import Callable, Dict, Generic, Iterator, Optional, TypeVar

from par.errors import ParError
from par.plugins import load_plugins

T = TypeVar("T")


class Registry(Generic[T]):
    """A named collection with aliases and an error that lists what exists.

    Lookup is case-insensitive and treats ``-`` and ``_`` alike, so
    ``BadNet-Stripes`` and ``badnet_stripes`` find the same entry.
    """

    def __init__(self, kind: str, builtins: Optional[str] = None):
        self.kind = kind
        self._items: Dict[str, T] = {}
        self._aliases: Dict[str, str] = {}
        self._builtins = builtins  # package whose import registers the built-in entries, loaded on first lookup

    def _load_builtins(self) -> None:
        """Imports the package that registers the built-ins (once): a module that holds only the registry
        (the training loop's view of objectives) still finds every built-in by name."""
        if self._builtins:
            package, self._builtins = self._builtins, None  # cleared first: the package's import looks names up
            try:
                importlib.import_module(package)
            except BaseException:  # not a half-filled registry: the next lookup meets the same error
                self._builtins = package
                raise

    @staticmethod
    def _key(name: str) -> str:
        return name.strip().lower().replace("-", "_")

    def register(self, name: str, *aliases: str) -> Callable[[T], T]:
        """Decorator: ``@REGISTRY.register("badnet_rs", "badnet-stripes")``."""

        def add(obj: T) -> T:
            self.add(name, obj, *aliases)
            return obj

        return add

    def add(self, name: str, obj: T, *aliases: str) -> None:
        taken = [a for a in (name, *aliases) if self._key(a) in self._aliases]
        if taken:
            owner = self._aliases[self._key(taken[0])]
            raise ParError(f"{self.kind} {taken[0]!r} is already registered (as {owner!r}): choose another name")
        self._items[name] = obj
        for alias in (name, *aliases):
            self._aliases[self._key(alias)] = name

    def lazy(self, name: str, target: str, *aliases: str) -> None:
        """Registers ``"package.module:attr"``, imported on first lookup (entry-point style).

        For built-ins whose module builds on the registry's own module (BadCLIP's trigger lives with
        its patch optimiser, which uses the trigger algebra): naming them avoids an import circle.
        """
        self.add(name, _Lazy(target), *aliases)

    def remove(self, name: str) -> None:
        """Drops ``name`` and its aliases: for a registration scoped to a test or an experiment."""
        key = self.canonical(name)
        del self._items[key]
        self._aliases = {alias: target for alias, target in self._aliases.items() if target != key}

    def canonical(self, name: str) -> str:
        """The registered name for ``name``; user plugins are imported before giving up."""
        self._load_builtins()
        if self._key(name) not in self._aliases:
            load_plugins()
        try:
            return self._aliases[self._key(name)]
        except KeyError:
            known = ", ".join(sorted(self._items))
            raise ParError(f"unknown {self.kind} {name!r}; known: {known}") from None

    def get(self, name: str) -> T:
        key = self.canonical(name)
        item = self._items[key]
        if isinstance(item, _Lazy):
            item = self._items[key] = item.load()
        return item

    def names(self) -> list:
        """Every registered name, the plugins' included."""
        self._load_builtins()
        load_plugins()
        return sorted(self._items)

    def in_order(self) -> list:
        """Names in registration order (e.g. the paper's order of attacks; the plugins' after the built-ins)."""
        self._load_builtins()
        load_plugins()
        return list(self._items)

    def __contains__(self, name: str) -> bool:
        self._load_builtins()
        if self._key(name) not in self._aliases:
            load_plugins()
        return self._key(name) in self._aliases

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


class _Lazy:
    def __init__(self, target: str):
        self.target = target

    def load(self):
        module, attr = self.target.split(":")
        return getattr(importlib.import_module(module), attr)
