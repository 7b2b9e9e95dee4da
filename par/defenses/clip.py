"""``ft``: plain fine-tuning with the CLIP loss (the objective ``clip``, also pre-training's), and
``ft-aug``: the same with PAR's augmentation (noise + erasing), which shows what PAR's loss adds beyond it."""
from __future__ import annotations

from par.defenses.base import DEFENSES, Objective
from par.defenses.finetune import FineTune, defense


@defense("ft", "clip", objective="clip", settings={"augment": "none"})
class ClipObjective(Objective):
    """The symmetric InfoNCE loss of CLIP over the (global) batch."""

    def __call__(self, model, batch):
        image, text, scale = model(batch.images, batch.tokens)
        return {"loss": self.context.contrastive(image, text, scale)}


DEFENSES.add("ft-aug", FineTune("clip", settings={"augment": "par"}))
