"""PAR, Perturb and Recover (Singh, Croce, Hein, 2024; docs/PAR-NOTES.md sections 1-2), in one place:
its loss terms, its augmentation and its objective.

The loss is the CLIP loss **minus** the thresholded distance of the model's embeddings to a frozen
copy of the poisoned model: the cleaned model is pushed away from the poisoned one until the
batch-mean squared distance passes ``tau``, and only the CLIP loss acts beyond it.

The augmentation (section 2), on images already resized and centre-cropped: with p=0.5 add
Gaussian noise (sigma 0.2), normalise, then with p=0.5 erase a random square of 0.5-1 % of the
image, filled with the mean of the erased region. torchvision's ``RandomErasing`` fills with a
constant or random values, not the local mean, and works one image at a time, so the erasing is
written here, vectorised. Draws are made on the generator's device (the loop seeds one on the GPU),
so a batch's noise is neither drawn by the CPU nor copied to the GPU at every step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Sequence

import torch
import torch.nn.functional as F

from par.augment import AUGMENTATIONS, normalize
from par.defenses.base import Objective, ObjectiveParams
from par.defenses.finetune import defense
from par.errors import ParError


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor, loss_fn=None) -> torch.Tensor:
    """Symmetric InfoNCE on L2-normalised features, via open_clip's ``ClipLoss``.

    Pass ``loss_fn`` (a ``ClipLoss`` built with rank/world size) to contrast over the global batch.
    """
    if loss_fn is None:
        from open_clip import ClipLoss

        loss_fn = ClipLoss()
    return loss_fn(image_features, text_features, logit_scale)


def par_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Batch mean of ``||a - b||^2`` summed over embedding dims (inputs already normalised)."""
    return (a - b).pow(2).sum(dim=-1).mean()


def par_terms(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    frozen_image_emb: torch.Tensor,
    frozen_text_emb: torch.Tensor,
    logit_scale: torch.Tensor | float,
    tau: float = 2.15,
    loss_fn=None,
    reduce=None,
) -> Dict[str, torch.Tensor]:
    """The PAR loss and its parts (for logging); see ``par_loss``.

    ``reduce`` (distributed training) maps a local batch mean to the global one, so that
    the threshold is decided on the global batch as in a single process.
    """
    image = F.normalize(image_emb, dim=-1)
    text = F.normalize(text_emb, dim=-1)
    frozen_image = F.normalize(frozen_image_emb.detach(), dim=-1)
    frozen_text = F.normalize(frozen_text_emb.detach(), dim=-1)
    scale = torch.as_tensor(logit_scale, device=image.device).detach()  # a constant in PAR
    l_clip = clip_loss(image, text, scale, loss_fn)
    s_image = par_distance(image, frozen_image)
    s_text = par_distance(text, frozen_text)
    keep_image = (reduce(s_image) if reduce else s_image.detach()) <= tau
    keep_text = (reduce(s_text) if reduce else s_text.detach()) <= tau
    perturb = torch.where(keep_image, s_image, 0.0) + torch.where(keep_text, s_text, 0.0)
    loss = l_clip - 0.5 * perturb
    return {"loss": loss, "clip_loss": l_clip, "image_distance": s_image, "text_distance": s_text}


def par_loss(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    frozen_image_emb: torch.Tensor,
    frozen_text_emb: torch.Tensor,
    logit_scale: torch.Tensor | float,
    tau: float = 2.15,
) -> torch.Tensor:
    """``L_clip - 0.5 * (thr(S_img) + thr(S_txt))`` on raw (un-normalised) embeddings.

    ``logit_scale`` is the multiplicative scale (``model.logit_scale.exp()``, what
    open_clip's forward returns); it is treated as a constant. ``S_*`` is the batch mean
    of the squared L2 distance between the normalised trainable and frozen embeddings,
    and ``thr(S) = S if S <= tau else 0``.
    """
    return par_terms(image_emb, text_emb, frozen_image_emb, frozen_text_emb, logit_scale, tau)["loss"]


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


@dataclass
class PARParams(ObjectiveParams):
    tau: float = 2.15  # threshold on the batch-mean squared embedding distance to the frozen model
    train_logit_scale: bool = False  # PAR treats the temperature as a constant

    def __post_init__(self):
        if not (math.isfinite(self.tau) and self.tau > 0):  # at <= 0 no distance is ever kept: plain fine-tuning
            raise ParError(f"par: objective_params.tau must be a finite number > 0, got {self.tau}")
        if self.train_logit_scale:  # its loss detaches the scale: the setting would do nothing (and stall DDP)
            raise ParError("par treats the temperature as a constant: set objective_params.train_logit_scale: false")


@defense("par")
class PARObjective(Objective):
    """CLIP loss minus the thresholded distance to the frozen poisoned model."""

    Params = PARParams
    needs_frozen = True

    def __call__(self, model, batch):
        image, text, scale = model(batch.images, batch.tokens)
        return self.against_frozen(batch, image, text, scale)

    def against_frozen(self, batch, image, text, scale):
        """PAR's terms for the trainable model's embeddings of ``batch``, against the frozen model's."""
        with torch.no_grad():
            frozen_image, frozen_text, _ = self.frozen(batch.images, batch.tokens)
        # distributed: the threshold is decided on the global batch mean, as in a single process
        return par_terms(image, text, frozen_image, frozen_text, scale, self.params.tau, self.context.contrastive,
                         self.context.reduce_mean)

    def plot_guides(self):
        return {"distance_threshold": self.params.tau}
