"""``ft``: plain fine-tuning with the CLIP loss (the objective ``clip``, also pre-training's)."""
from __future__ import annotations

from par.defenses.base import Objective
from par.defenses.finetune import defense


@defense("ft", "clip", objective="clip")
class ClipObjective(Objective):
    """The symmetric InfoNCE loss of CLIP over the (global) batch."""

    def __call__(self, model, batch):
        image, text, scale = model(batch.images, batch.tokens)
        return {"loss": self.context.contrastive(image, text, scale)}
