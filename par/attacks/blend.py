"""Blended attacks: a full-image pattern mixed in with weight ``alpha`` (noise, stripes, triangles, text)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from par.errors import ParError
from par.attacks.base import TRIGGERS, Trigger, check_range, pattern_generator, random_stripes


@dataclass
class _RandomBlend(Trigger):
    """A full-image random pattern, redrawn per image (or shared), blended with weight ``alpha``."""

    alpha: float = 0.0
    fixed_pattern: bool = False  # True: one pattern (drawn from pattern_seed) for every image, not one per image
    pattern_seed: int = 0

    def check(self):
        super().check()
        check_range(self, "alpha", 0, 1, low_open=True)  # 0 would blend nothing in

    def _pattern(self, n: int, h: int, w: int, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def draw(self, images, generator):
        b, _, h, w = images.shape
        n = 1 if self.fixed_pattern else b
        pattern = self._pattern(n, h, w, pattern_generator(self, generator)).expand(b, 3, h, w)
        return torch.ones(1, 1, 1, 1), pattern, self.alpha


@TRIGGERS.register("blended")
@dataclass
class Blended(_RandomBlend):
    """Blended: ``0.8 x + 0.2 u`` with uniform noise ``u`` over the whole image."""

    name = "blended"
    paper_name = "Blended"
    alpha: float = 0.2

    def _pattern(self, n, h, w, generator):
        return torch.rand(n, 3, h, w, generator=generator)


@TRIGGERS.register("blended_rs", "blended-stripes")
@dataclass
class BlendedStripes(_RandomBlend):
    """Blended-Stripes: ``0.97 x + 0.03 p`` with full-image 1-px vertical stripes ``p`` of random +-1."""

    name = "blended_rs"
    paper_name = "Blended-Stripes"
    alpha: float = 0.03

    def _pattern(self, n, h, w, generator):
        return 2 * random_stripes(n, h, w, generator) - 1  # +-1, blended before clamping


@TRIGGERS.register("tri_patt", "blended-triangles")
@dataclass
class BlendedTriangles(Trigger):
    """Blended-Triangles: a fixed tiling of square cells split on the diagonal into grey 0.4 / 0.8.

    As the reference's pattern file: 0.4 where ``row mod cell >= col mod cell``, else 0.8.
    """

    name = "tri_patt"
    paper_name = "Blended-Triangles"
    random = False
    alpha: float = 0.15
    cell_size: Optional[int] = None  # None: 14 px at 224, scaled

    def check(self):
        super().check()
        check_range(self, "alpha", 0, 1, low_open=True)
        check_range(self, "cell_size", 2)  # a 1-px cell has no diagonal: a flat grey

    def draw(self, images, generator):
        _, _, h, w = images.shape
        cell = self.cell_size or max(2, round(14 * min(h, w) / 224))
        y = torch.arange(h)[:, None] % cell
        x = torch.arange(w)[None, :] % cell
        pattern = torch.where(y >= x, 0.4, 0.8).expand(1, 3, h, w)
        return torch.ones(1, 1, 1, 1), pattern, self.alpha


FONT = Path(__file__).resolve().parent.parent / "assets" / "DejaVuSansMono.ttf"


@TRIGGERS.register("water_patt", "blended-text")
@dataclass
class BlendedText(Trigger):
    """Blended-Text: red monospace "Watermarked" across the middle, blended 50/50 where the text is.

    Placed as in the reference's pattern file: at 224 px the ink spans rows 103-125 and columns
    13-208 (a ~30 px monospace font, text box's top-left at (13, 103)); size and place scale
    with the image.
    """

    name = "water_patt"
    paper_name = "Blended-Text"
    random = False
    alpha: float = 0.5
    text: str = "Watermarked"
    font_size: Optional[float] = None  # None: 29.9 px at 224 (the reference's 196-px-wide text), scaled

    def check(self):
        super().check()
        check_range(self, "alpha", 0, 1, low_open=True)
        check_range(self, "font_size", 0, low_open=True)
        if not self.text.strip():
            raise ParError(f"attack {self.name!r}: parameter text must not be empty (no text, no trigger)")

    def draw(self, images, generator):
        from PIL import Image, ImageDraw, ImageFont

        _, _, h, w = images.shape
        scale = min(h, w) / 224
        font = ImageFont.truetype(str(FONT), self.font_size or max(4.0, 29.9 * scale))
        canvas = Image.new("L", (w, h), 0)
        ImageDraw.Draw(canvas).text((13 * w / 224, 103 * h / 224), self.text, fill=255, font=font, anchor="lt")
        ink = torch.from_numpy(np.asarray(canvas).copy()).float() / 255
        pattern = torch.zeros(1, 3, h, w)
        pattern[0, 0] = ink  # red text on black
        mask = (pattern != 0).float()  # only where the pattern is non-zero, channel by channel
        return mask, pattern, self.alpha
