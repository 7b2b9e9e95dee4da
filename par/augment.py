"""Batch image augmentations on the training device, found by name (``augment`` in a training config).

``none`` is here; PAR's recipe (``par``) is registered with PAR itself (``par.defenses.par``), and the
registry loads the built-in defenses on first lookup.
"""
from __future__ import annotations

from typing import Sequence

import torch

from par.registry import Registry

AUGMENTATIONS: Registry = Registry("augmentation", builtins="par.defenses")


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    mean_t = torch.as_tensor(mean, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    return (images - mean_t) / std_t


@AUGMENTATIONS.register("none")
def no_augment(images: torch.Tensor, mean, std, generator=None) -> torch.Tensor:
    return normalize(images, mean, std)
