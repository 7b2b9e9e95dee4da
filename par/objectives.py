"""Training objectives (losses plus the extra views they need), found by name.

``clip`` (alias ``ft``) is the plain CLIP loss: pre-training, or the plain fine-tuning
baseline. ``par`` is PAR (PAR-NOTES section 1). ``cleanclip`` is CleanCLIP (section 9).
Adding one means registering a class here or from a plugin; the training loop only calls
``objective(model, batch)`` and logs the terms it returns.

Every objective runs the trainable model through one forward call of ``model`` (the DDP
wrapper when distributed), so gradients are synchronised.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from par.registry import Registry

OBJECTIVES: Registry = Registry("objective")


@dataclass
class Batch:
    images: torch.Tensor  # augmented and normalised, on the device
    tokens: torch.Tensor
    raw_images: torch.Tensor  # uint8, as decoded, on the device
    captions: Optional[List[str]] = None


class Objective:
    needs_frozen = False

    def __init__(self, cfg, contrastive, frozen=None, tokenizer=None, mean=None, std=None, seed: int = 0, dist=None):
        self.cfg, self.contrastive, self.frozen = cfg, contrastive, frozen
        self.tokenizer, self.mean, self.std, self.dist = tokenizer, mean, std, dist

    def __call__(self, model, batch: Batch) -> Dict[str, torch.Tensor]:
        raise NotImplementedError


@OBJECTIVES.register("clip", "ft")
class ClipObjective(Objective):
    """The symmetric InfoNCE loss of CLIP over the (global) batch."""

    def __call__(self, model, batch):
        image, text, scale = model(batch.images, batch.tokens)
        return {"loss": self.contrastive(image, text, scale)}


@OBJECTIVES.register("par")
class PARObjective(Objective):
    """CLIP loss minus the thresholded distance to the frozen poisoned model."""

    needs_frozen = True

    def __call__(self, model, batch):
        from par.losses import par_terms

        image, text, scale = model(batch.images, batch.tokens)
        with torch.no_grad():
            frozen_image, frozen_text, _ = self.frozen(batch.images, batch.tokens)
        # distributed: the threshold is decided on the global batch mean, as in a single process
        reduce = self.dist.mean if self.dist is not None and self.dist.world_size > 1 else None
        return par_terms(image, text, frozen_image, frozen_text, scale, self.cfg.tau, self.contrastive, reduce)


@OBJECTIVES.register("cleanclip")
class CleanCLIPObjective(Objective):
    """CLIP loss + lambda/2 * (InfoNCE(image, AutoAugment(image)) + InfoNCE(caption, EDA(caption)))."""

    def __init__(self, *args, seed: int = 0, **kwargs):
        from torchvision.transforms import AutoAugment

        super().__init__(*args, seed=seed, **kwargs)
        self.autoaugment = AutoAugment()
        self.rng = random.Random(seed)

    def __call__(self, model, batch):
        from par.augment import normalize
        from par.data import to_float
        from par.text_augment import eda_batch

        if batch.captions is None:
            raise RuntimeError("cleanclip needs the batch's captions")
        augmented = torch.stack([self.autoaugment(img) for img in batch.raw_images.cpu()]).to(batch.images.device)
        aug_images = normalize(to_float(augmented), self.mean, self.std)
        aug_tokens = self.tokenizer(eda_batch(batch.captions, self.rng)).to(batch.tokens.device)
        n = batch.images.shape[0]
        image, text, scale = model(torch.cat([batch.images, aug_images]), torch.cat([batch.tokens, aug_tokens]))
        clip = self.contrastive(image[:n], text[:n], scale)
        image_image = self.contrastive(image[:n], image[n:], scale)
        text_text = self.contrastive(text[:n], text[n:], scale)
        loss = clip + self.cfg.cleanclip_lambda * 0.5 * (image_image + text_text)
        return {"loss": loss, "clip_loss": clip, "image_image_loss": image_image, "text_text_loss": text_text}
