"""User extensions (triggers, and later defenses) registered from the user's own modules.

A plugin is any importable module that registers into par's registries on import, e.g.::

    # my_triggers.py
    from dataclasses import dataclass
    from par.triggers import TRIGGERS, Trigger

    @TRIGGERS.register("corner_square")
    @dataclass
    class CornerSquare(Trigger):
        name = "corner_square"
        paper_name = "Corner square"
        def draw(self, images, generator):
            ...  # return mask, pattern, alpha

Name it in ``PAR_PLUGINS`` (comma-separated module names, importable from ``PYTHONPATH``) or
declare it as a ``par.plugins`` entry point of an installed package. Plugins are imported the
first time a name is not found, so every command that takes ``--attack`` accepts them.
"""
from __future__ import annotations

import importlib
import os
from importlib.metadata import entry_points

from par.errors import ParError

_loaded = False


def load_plugins() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True  # set first: a plugin's import may look names up
    try:
        for module in [m.strip() for m in os.environ.get("PAR_PLUGINS", "").split(",") if m.strip()]:
            try:
                importlib.import_module(module)
            except ImportError as e:
                raise ParError(f"cannot import plugin module {module!r} named in PAR_PLUGINS: {e}") from None
        for entry in entry_points(group="par.plugins"):
            try:
                entry.load()
            except Exception as e:
                raise ParError(f"cannot load plugin {entry.name!r} ({entry.value}) of the par.plugins entry points: "
                               f"{type(e).__name__}: {e}") from None
    except BaseException:  # every later lookup meets the same error, not a registry missing the plugins
        _loaded = False
        raise
