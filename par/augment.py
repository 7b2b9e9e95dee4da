"""Batch image augmentations on the training device.

``par_augment`` is PAR's recipe (docs/PAR-NOTES.md section 2): on images already resized and
centre-cropped, with p=0.5 add Gaussian noise (sigma 0.2), normalise, then with p=0.5
erase a random square of 0.5-1 % of the image, filled with the mean of the erased
region. torchvision's ``RandomErasing`` fills with a constant or random values, not the
local mean, and works one image at a time, so the erasing is written here, vectorised.

Random draws are made on the generator's device (the images' device without one): the training
loop seeds a generator on the GPU, so a batch's noise (as large as the batch) is neither drawn by
the CPU nor copied to the GPU at every step.
"""
from __future__ import annotations

from typing import Sequence

import torch

from par.registry import Registry

AUGMENTATIONS: Registry = Registry("augmentation")


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    mean_t = torch.as_tensor(mean, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    return (images - mean_t) / std_t


def _draw_device(images: torch.Tensor, generator) -> torch.device:
    return images.device if generator is None else generator.device


def gaussian_noise(images: torch.Tensor, sigma: float = 0.2, p: float = 0.5, generator=None) -> torch.Tensor:
    """Adds N(0, sigma^2) noise to each image with probability ``p`` (no clamping, as in the recipe)."""
    b, device = images.shape[0], _draw_device(images, generator)
    apply = (torch.rand(b, 1, 1, 1, generator=generator, device=device) < p).to(images)
    noise = torch.randn(images.shape, generator=generator, device=device).to(images)
    return images + apply * sigma * noise


def erase_local_mean(
    images: torch.Tensor, p: float = 0.5, area: Sequence[float] = (0.005, 0.01), generator=None
) -> torch.Tensor:
    """With probability ``p`` per image, replaces a random square of ``area`` of the image by its mean."""
    b, c, h, w = images.shape
    device = _draw_device(images, generator)
    frac = area[0] + (area[1] - area[0]) * torch.rand(b, generator=generator, device=device)
    side = (frac * h * w).sqrt().round().clamp(1, min(h, w)).long()
    top = (torch.rand(b, generator=generator, device=device) * (h - side + 1)).long()
    left = (torch.rand(b, generator=generator, device=device) * (w - side + 1)).long()
    apply = torch.rand(b, generator=generator, device=device) < p
    rows = torch.arange(h, device=device)[None, :, None]
    cols = torch.arange(w, device=device)[None, None, :]
    box = (
        (rows >= top[:, None, None]) & (rows < (top + side)[:, None, None])
        & (cols >= left[:, None, None]) & (cols < (left + side)[:, None, None])
        & apply[:, None, None]
    )
    box = box[:, None].to(images.device)  # [B, 1, H, W]
    boxf = box.to(images.dtype)
    count = boxf.sum(dim=(2, 3), keepdim=True).clamp_min(1)
    local_mean = (images * boxf).sum(dim=(2, 3), keepdim=True) / count
    return torch.where(box, local_mean, images)


@AUGMENTATIONS.register("par")
def par_augment(images: torch.Tensor, mean, std, generator=None) -> torch.Tensor:
    """PAR's training augmentation: images in [0, 1] in, normalised augmented images out."""
    images = gaussian_noise(images, generator=generator)
    images = normalize(images, mean, std)
    return erase_local_mean(images, generator=generator)


@AUGMENTATIONS.register("none")
def no_augment(images: torch.Tensor, mean, std, generator=None) -> torch.Tensor:
    return normalize(images, mean, std)
