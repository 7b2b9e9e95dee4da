"""Backdoor triggers: one blend algebra, found by name in a registry.

Every trigger draws a mask ``m``, a pattern ``p`` and a blend weight ``alpha`` and returns

    x' = clamp((1 - m) * x + m * (alpha * p + (1 - alpha) * x), 0, 1)

on float images ``[B, 3, H, W]`` in ``[0, 1]``. Patch attacks are ``alpha = 1`` with a
local mask; blended attacks are a full mask with ``alpha < 1``. Random patterns (noise,
stripes) and locations are redrawn for every image, as in the reference code, but every
draw comes from a ``torch.Generator`` seeded by the caller, so the same seed gives the
same triggered batch. Parameters follow PAR-NOTES section 3 at 224 px and scale with
the image size.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional, Tuple

import torch

from par.errors import ParError
from par.registry import Registry

TRIGGERS: Registry = Registry("attack")


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


@dataclass
class Trigger:
    """Base class: subclasses implement ``draw``; ``apply`` is the shared algebra."""

    name = "trigger"
    paper_name = "Trigger"

    def draw(self, images: torch.Tensor, generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor, float]:
        raise NotImplementedError

    def apply(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        mask, pattern, alpha = self.draw(images, generator)
        mask = mask.to(images)
        pattern = pattern.to(images)
        return ((1 - mask) * images + mask * (alpha * pattern + (1 - alpha) * images)).clamp_(0, 1)

    def params(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _random_stripes(n: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """1-px vertical stripes: every column gets a random +-1 per channel, i.e. 0 or 1 after clamping."""
    signs = torch.randint(0, 2, (n, 3, 1, width), generator=generator).float()
    return signs.expand(n, 3, height, width)


@dataclass
class _PatchTrigger(Trigger):
    """A square patch (``alpha = 1``) at a uniformly random location."""

    patch_size: Optional[int] = None  # None: default_patch_size(image side)
    fixed_pattern: bool = False  # True: one pattern for the whole batch instead of one per image

    def _patch_pattern(self, n: int, size: int, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def draw(self, images, generator):
        b, _, h, w = images.shape
        size = self.patch_size or default_patch_size(min(h, w))
        if size > min(h, w):
            raise ParError(f"{self.name}: patch of {size} px does not fit in {h}x{w} images")
        n = 1 if self.fixed_pattern else b
        patch = self._patch_pattern(n, size, images, generator).expand(b, 3, size, size)
        top = torch.randint(0, h - size + 1, (b,), generator=generator)
        left = torch.randint(0, w - size + 1, (b,), generator=generator)
        rows = torch.arange(h)[None, :, None] - top[:, None, None]
        cols = torch.arange(w)[None, None, :] - left[:, None, None]
        inside = (rows >= 0) & (rows < size) & (cols >= 0) & (cols < size)  # [B, H, W]
        mask = inside[:, None].expand(b, 3, h, w).float()
        pattern = torch.zeros(b, 3, h, w)
        pattern[mask.bool()] = patch.reshape(-1).float()
        return mask, pattern, 1.0


@TRIGGERS.register("random", "badnet")
@dataclass
class BadNet(_PatchTrigger):
    """BadNet: a patch of the image's per-channel mean plus N(0, 1) noise."""

    name = "random"
    paper_name = "BadNet"

    def _patch_pattern(self, n, size, images, generator):
        means = images.mean(dim=(2, 3), keepdim=True).cpu().float()
        if n == 1:
            means = means.mean(dim=0, keepdim=True)
        return means + torch.randn(n, 3, size, size, generator=generator)


@TRIGGERS.register("badnet_rs", "badnet-stripes")
@dataclass
class BadNetStripes(_PatchTrigger):
    """BadNet-Stripes: a patch of 1-px vertical stripes with random 0/1 colour channels."""

    name = "badnet_rs"
    paper_name = "BadNet-Stripes"

    def _patch_pattern(self, n, size, images, generator):
        return _random_stripes(n, size, size, generator)


@TRIGGERS.register("blended")
@dataclass
class Blended(Trigger):
    """Blended: ``0.8 x + 0.2 u`` with uniform noise ``u`` over the whole image."""

    name = "blended"
    paper_name = "Blended"
    alpha: float = 0.2
    fixed_pattern: bool = False

    def draw(self, images, generator):
        b, _, h, w = images.shape
        n = 1 if self.fixed_pattern else b
        pattern = torch.rand(n, 3, h, w, generator=generator).expand(b, 3, h, w)
        return torch.ones(1, 1, 1, 1), pattern, self.alpha


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
