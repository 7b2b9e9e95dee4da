"""The trigger algebra every attack shares, and the registry attacks are found by name in.

Every trigger draws a mask ``m``, a pattern ``p`` and a blend weight ``alpha`` and returns

    x' = clamp((1 - m) * x + m * (alpha * p + (1 - alpha) * x), 0, 1)

on float images ``[B, 3, H, W]`` in ``[0, 1]``. Patch attacks are ``alpha = 1`` with a
local mask; blended attacks are a full mask with ``alpha < 1``. Random patterns (noise,
stripes) and locations are redrawn for every image, as in the reference code, but every
draw comes from a ``torch.Generator`` seeded by the caller, so the same seed gives the
same triggered batch. Parameters follow docs/PAR-NOTES.md section 3 at 224 px and scale with
the image size.
"""
from __future__ import annotations

import math
import numbers
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, Sequence, Tuple

import numpy as np
import torch

from par.errors import ParError
from par.registry import Registry

TRIGGERS: Registry = Registry("attack")


def row_seed(seed: int, row: int) -> int:
    """The seed of one image's trigger draw: a function of the run's seed and the image's row alone,
    so poisoning and evaluation give every image the same trigger however the data is batched."""
    return int(np.random.SeedSequence([seed, row]).generate_state(1)[0])


@dataclass
class AttackContext:
    """What an attack may use to build its artifacts before poisoning (e.g. BadCLIP's optimised patch).

    ``clean_checkpoint()`` returns ``(checkpoint, key)`` of a clean CLIP of the same encoder, built on
    first use; ``key`` names what it depends on, so artifacts made from it can be cached by it.
    """

    label: str
    model: str
    clean_data: str  # image,caption CSV of clean pairs
    templates: str
    workdir: Path  # where artifacts are cached
    clean_checkpoint: Callable[[], Tuple[Path, str]]
    settings: dict = field(default_factory=dict)  # this attack's preparation settings


def default_patch_size(image_size: int) -> int:
    """16 px at 224, scaled proportionally; 336-px models use the reference's 32-px patch."""
    if image_size == 336:
        return 32
    return max(1, round(16 * image_size / 224))


def check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ParError(f"triggers take float images of shape [B, 3, H, W]; got {shape}")
    if not images.is_floating_point():
        raise ParError(f"triggers take float images in [0, 1]; got dtype {images.dtype}")
    if images.numel() and (images.min() < 0 or images.max() > 1):
        raise ParError(
            f"triggers take images in [0, 1]; got values in [{images.min().item():.3g}, {images.max().item():.3g}] "
            "(apply triggers before normalisation)"
        )


def _typed(trigger: "Trigger", key: str, value, hint):
    """``value`` as the parameter's declared type (``Optional[int]``, ``float``, ``bool``, ``str``), or an error
    naming the parameter: YAML reads ``alpha=abc`` as text and ``1e-3`` as text too."""
    where = f"attack {trigger.name!r}: parameter {key}"
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is typing.Union:
        if value is None and type(None) in typing.get_args(hint):
            return None
        if len(args) != 1:
            return value
        hint = args[0]
    if hint is bool:
        if not isinstance(value, bool):
            raise ParError(f"{where} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, float) and math.isfinite(value) and value == int(value):
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ParError(f"{where} must be a whole number, got {value!r}")
        return int(value)
    if hint is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ParError(f"{where} must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ParError(f"{where} must be a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise ParError(f"{where} must be text, got {value!r}")
    return value


def check_range(trigger: "Trigger", key: str, low=None, high=None, low_open: bool = False) -> None:
    """Refuses parameter ``key`` (unless None) outside ``[low, high]`` (``(low, high]`` with ``low_open``)."""
    value = getattr(trigger, key)
    if value is None:
        return
    if (low is not None and (value < low or (low_open and value == low))) or (high is not None and value > high):
        if high is None:
            bound = f"{'greater than' if low_open else 'at least'} {low}"
        else:
            bound = f"in {'(' if low_open else '['}{'-inf' if low is None else low}, {high}]"
        raise ParError(f"attack {trigger.name!r}: parameter {key} must be {bound}, got {value!r}")


@dataclass
class Trigger:
    """Base class: subclasses implement ``draw``; ``apply`` is the shared algebra."""

    name = "trigger"
    paper_name = "Trigger"
    random = True  # draws from the generator; False: the same output whatever the seed

    def __post_init__(self):
        """Parameters are checked when a trigger is made, types then ranges (``check``), so that a bad
        ``--attack-param`` is an error before any work rather than a torch error in the middle of it."""
        try:
            hints = typing.get_type_hints(type(self))
        except Exception:  # a plugin's annotations that do not resolve: its own checks only
            hints = {}
        for f in fields(self):
            if f.name in hints:
                setattr(self, f.name, _typed(self, f.name, getattr(self, f.name), hints[f.name]))
        self.check()

    def check(self) -> None:
        """Refuses parameters out of range (subclasses extend it; seeds are whole numbers from 0)."""
        for f in fields(self):
            if f.name.endswith("_seed"):
                check_range(self, f.name, 0)

    def draw(self, images: torch.Tensor, generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor, float]:
        raise NotImplementedError

    def apply(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        mask, pattern, alpha = self.draw(images, generator)
        mask = mask.to(images)
        pattern = pattern.to(images)
        return ((1 - mask) * images + mask * (alpha * pattern + (1 - alpha) * images)).clamp_(0, 1)

    def apply_rows(self, images: torch.Tensor, seed: int, rows: Sequence[int]) -> torch.Tensor:
        """``images`` triggered, image ``i`` drawn from ``row_seed(seed, rows[i])``: independent of batching."""
        if not self.random:
            return self.apply(images, torch.Generator())
        return torch.cat([self.apply(images[i:i + 1], torch.Generator().manual_seed(row_seed(seed, int(row))))
                          for i, row in enumerate(rows)])

    def prepare(self, context: AttackContext) -> dict:
        """Builds what the attack needs before it can be applied; returns the parameters to add (none here)."""
        return {}

    @classmethod
    def check_prepare(cls, settings: dict) -> None:
        """Refuses ``prepare`` settings (a profile's ``attack_prepare``) it would not read, before any work."""
        if settings:
            raise ParError(f"attack {cls.name!r} builds nothing before poisoning: attack_prepare settings {settings} "
                           "would go unused")

    def params(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def random_stripes(n: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """1-px vertical stripes: every column gets a random +-1 per channel, i.e. 0 or 1 after clamping."""
    signs = torch.randint(0, 2, (n, 3, 1, width), generator=generator).float()
    return signs.expand(n, 3, height, width)


def pattern_generator(trigger, generator: torch.Generator) -> torch.Generator:
    """A fixed pattern comes from its own seed, so it is the same for every image and every call
    (each image of a poisoned set or an evaluation draws from its own generator)."""
    return torch.Generator().manual_seed(trigger.pattern_seed) if trigger.fixed_pattern else generator


def place_patches(patches: torch.Tensor, top: torch.Tensor, left: torch.Tensor, h: int, w: int):
    """Mask and pattern ``[B, 3, H, W]`` holding square ``patches`` ``[B, 3, p, p]`` at ``(top, left)``."""
    b, _, size, _ = patches.shape
    rows = torch.arange(h)[None, :, None] - top[:, None, None]
    cols = torch.arange(w)[None, None, :] - left[:, None, None]
    inside = (rows >= 0) & (rows < size) & (cols >= 0) & (cols < size)  # [B, H, W]
    mask = inside[:, None].expand(b, 3, h, w)
    pattern = torch.zeros(b, 3, h, w)
    pattern[mask] = patches.reshape(-1).float()
    return mask.float(), pattern


def get_trigger(name: str, **params) -> Trigger:
    """The trigger ``name`` (CLI name or alias) with its parameters set."""
    cls = TRIGGERS.get(name)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ParError(f"attack {cls.name!r} has no parameter(s) {unknown}; it takes {sorted(known)}")
    return cls(**params)


def apply(name: str, images: torch.Tensor, *, seed: int, **params) -> torch.Tensor:
    """Returns ``images`` with trigger ``name`` applied; the same seed gives the same batch."""
    check_images(images)
    generator = torch.Generator().manual_seed(int(seed))
    return get_trigger(name, **params).apply(images, generator)
