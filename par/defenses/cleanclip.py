"""CleanCLIP (Bansal et al., ICCV 2023; docs/PAR-NOTES.md section 9): the CLIP loss plus unimodal
self-supervision (each image against its AutoAugment view, each caption against its EDA rewrite)."""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from par.defenses.base import Objective, ObjectiveParams, _as_tuple
from par.defenses.finetune import defense
from par.errors import ParError


@dataclass
class CleanCLIPParams(ObjectiveParams):
    unimodal_weight: float = 1.0  # lambda: weight of the image-image and text-text terms
    train_logit_scale: bool = False

    def __post_init__(self):
        if not (math.isfinite(self.unimodal_weight) and self.unimodal_weight >= 0):  # < 0 pushes views apart
            raise ParError(f"cleanclip: objective_params.unimodal_weight must be a finite number >= 0, "
                           f"got {self.unimodal_weight}")


@defense("cleanclip")
class CleanCLIPObjective(Objective):
    """CLIP loss + lambda/2 * (InfoNCE(image, AutoAugment(image)) + InfoNCE(caption, EDA(caption)))."""

    Params = CleanCLIPParams

    def __init__(self, model, params, context):
        from torchvision.transforms import AutoAugment

        super().__init__(model, params, context)
        self.autoaugment = AutoAugment()
        self.rng = random.Random(context.seed)  # EDA's choices

    def __call__(self, model, batch):
        ctx = self.context
        aug_images, aug_tokens = self.second_view(batch, self.autoaugment, self.rng)
        n = batch.images.shape[0]
        image, text, scale = model(torch.cat([batch.images, aug_images]), torch.cat([batch.tokens, aug_tokens]))
        clip = ctx.contrastive(image[:n], text[:n], scale)
        image_image = ctx.contrastive(image[:n], image[n:], scale)
        text_text = ctx.contrastive(text[:n], text[n:], scale)
        loss = clip + self.params.unimodal_weight * 0.5 * (image_image + text_text)
        return {"loss": loss, "clip_loss": clip, "image_image_loss": image_image, "text_text_loss": text_text}

    def state_dict(self):
        return {"eda_rng": self.rng.getstate()}

    def load_state_dict(self, state):
        self.rng.setstate(_as_tuple(state["eda_rng"]))
