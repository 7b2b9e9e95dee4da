"""Patch attacks: BadNet and BadNet-Stripes (a square patch, ``alpha = 1``, at a random location or a fixed one)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from par.errors import ParError

from par.attacks.base import (TRIGGERS, Trigger, check_range, default_patch_size, pattern_generator, place_patches,
                              random_stripes)


@dataclass
class _PatchTrigger(Trigger):
    """A square patch (``alpha = 1``) at a uniformly random location, or at ``top``/``left`` when given
    (the classic BadNet corner; a fixed place is also what lets a scan's inverted mask be checked)."""

    patch_size: Optional[int] = None  # None: default_patch_size(image side)
    fixed_pattern: bool = False  # True: one pattern (drawn from pattern_seed) for every image, not one per image
    # (BadNet's patch is still each image's own mean plus that one noise)
    pattern_seed: int = 0
    top: Optional[int] = None  # the patch's row in pixels; None: drawn per image
    left: Optional[int] = None

    def check(self):
        super().check()
        check_range(self, "patch_size", 1)
        check_range(self, "top", 0)
        check_range(self, "left", 0)

    def _patch_pattern(self, n: int, size: int, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def draw(self, images, generator):
        b, _, h, w = images.shape
        size = self.patch_size or default_patch_size(min(h, w))
        if size > min(h, w):
            raise ParError(f"{self.name}: patch of {size} px does not fit in {h}x{w} images")
        n = 1 if self.fixed_pattern else b
        patch = self._patch_pattern(n, size, images, pattern_generator(self, generator)).expand(b, 3, size, size)
        top = torch.randint(0, h - size + 1, (b,), generator=generator)
        left = torch.randint(0, w - size + 1, (b,), generator=generator)
        for key, drawn, side in (("top", top, h), ("left", left, w)):
            fixed = getattr(self, key)
            if fixed is not None:
                if fixed + size > side:
                    raise ParError(f"{self.name}: a {size}-px patch at {key}={fixed} does not fit in {h}x{w} images")
                drawn.fill_(fixed)  # drawn all the same, so the generator's stream does not depend on the choice
        mask, pattern = place_patches(patch, top, left, h, w)
        return mask, pattern, 1.0


@TRIGGERS.register("random", "badnet")
@dataclass
class BadNet(_PatchTrigger):
    """BadNet: a patch of the image's per-channel mean plus N(0, 1) noise."""

    name = "random"
    paper_name = "BadNet"

    def _patch_pattern(self, n, size, images, generator):
        means = images.mean(dim=(2, 3), keepdim=True).cpu().float()  # each image's own, batched or alone
        return means + torch.randn(n, 3, size, size, generator=generator)


@TRIGGERS.register("badnet_rs", "badnet-stripes")
@dataclass
class BadNetStripes(_PatchTrigger):
    """BadNet-Stripes: a patch of 1-px vertical stripes with random 0/1 colour channels."""

    name = "badnet_rs"
    paper_name = "BadNet-Stripes"

    def _patch_pattern(self, n, size, images, generator):
        return random_stripes(n, size, size, generator)
