"""WaNet: a smooth warping field instead of an additive pattern."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from par.errors import ParError

from par.attacks.base import TRIGGERS, Trigger, check_range


@TRIGGERS.register("warped", "wanet")
@dataclass
class WaNet(Trigger):
    """WaNet: a fixed random warping field (k = S, s = 1, grid rescale 1) applied with grid_sample.

    Not a blend: the image is resampled. The field is a function of ``field_seed`` and the
    image size alone, so every call (whatever its seed) warps with the same field.
    """

    name = "warped"
    paper_name = "WaNet"
    random = False
    field_seed: int = 0
    strength: float = 1.0  # s
    grid_rescale: float = 1.0
    grid_size: Optional[int] = None  # k; None: the image size

    def check(self):
        super().check()
        check_range(self, "strength", 0, low_open=True)  # 0: no warp at all
        check_range(self, "grid_rescale", 0, low_open=True)
        check_range(self, "grid_size", 1)

    def field(self, size: int) -> torch.Tensor:
        import torch.nn.functional as F

        k = self.grid_size or size
        g = torch.Generator().manual_seed(self.field_seed)
        ins = torch.rand(1, 2, k, k, generator=g) * 2 - 1
        ins = ins / ins.abs().mean()
        noise = F.interpolate(ins, size=(size, size), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
        line = torch.linspace(-1, 1, size)
        rows, cols = torch.meshgrid(line, line, indexing="ij")
        identity = torch.stack((cols, rows), dim=2)[None]
        return ((identity + self.strength * noise / size) * self.grid_rescale).clamp(-1, 1)

    def apply(self, images, generator):
        import torch.nn.functional as F

        b, _, h, w = images.shape
        if h != w:
            raise ParError(f"warped: square images only, got {h}x{w}")
        grid = self.field(h).to(images).expand(b, h, w, 2)
        return F.grid_sample(images, grid, align_corners=True).clamp_(0, 1)
