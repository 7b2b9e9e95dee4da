"""RoCLIP (Yang, Gao, Mirzasoleiman, NeurIPS 2023): images contrasted with their nearest captions from a pool."""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional

import torch

from par.defenses.base import Objective, ObjectiveParams, _as_tuple
from par.defenses.finetune import defense
from par.errors import ParError
from par.models import image_size


@dataclass
class RoCLIPParams(ObjectiveParams):
    pool_size: int = 131072  # caption embeddings kept, newest first (RoCLIP's pool, FIFO)
    match_every: int = 2  # every match_every-th epoch contrasts images with their nearest pool captions
    augment: bool = True  # RoCLIP's image augmentations (crop, flip, colour jitter, greyscale) and EDA captions
    train_logit_scale: bool = False

    def __post_init__(self):
        for name in ("pool_size", "match_every"):
            if getattr(self, name) < 1:
                raise ParError(f"roclip: objective_params.{name} must be at least 1, got {getattr(self, name)}")


def nearest_captions(images: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
    """For each (normalised) image embedding, the pool's caption embedding of highest cosine similarity."""
    similarity = images @ torch.nn.functional.normalize(pool, dim=-1).T
    return pool[similarity.argmax(dim=1)]


@defense("roclip")
class RoCLIPObjective(Objective):
    """RoCLIP (Yang, Gao, Mirzasoleiman, NeurIPS 2023): on matching epochs each image is contrasted with
    the caption most similar to it from a pool of recent caption embeddings instead of its own, which
    breaks the link between a poisoned image and its planted caption; other epochs use the CLIP loss.
    The pool is filled after each lookup, so a batch never matches its own captions.
    """

    Params = RoCLIPParams

    def __init__(self, model, params, context):
        from torchvision.transforms import v2

        super().__init__(model, params, context)
        self.pool: Optional[torch.Tensor] = None
        self.matching = False
        self.rng = random.Random(context.seed)  # EDA's choices
        self.image_augment = v2.Compose([
            v2.RandomResizedCrop(image_size(model), scale=(0.5, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
        ])

    def on_epoch_start(self, epoch: int) -> None:
        self.matching = (epoch + 1) % self.params.match_every == 0

    def __call__(self, model, batch):
        ctx = self.context
        images, tokens = batch.images, batch.tokens
        if self.params.augment:
            images, tokens = self.second_view(batch, self.image_augment, self.rng)
        image, text, scale = model(images, tokens)
        matched = self.matching and self.pool is not None
        if matched:
            neighbours = nearest_captions(image.detach(), self.pool.to(image.device))
            # the text tower has no term this step; the zero keeps DDP's every-parameter-used check happy
            loss = ctx.contrastive(image, neighbours, scale) + 0.0 * text.sum()
        else:
            loss = ctx.contrastive(image, text, scale)
        fresh = text.detach().float()  # the pool stays on the device (up to 131,072 x width floats)
        if ctx.gather is not None:  # every process's captions, as RoCLIP's code gathers them: one pool, as one process's
            fresh = ctx.gather(fresh)
        self.pool = fresh if self.pool is None else torch.cat([fresh, self.pool.to(fresh.device)])[: self.params.pool_size]
        return {"loss": loss, "matched": torch.tensor(float(matched), device=loss.device)}

    def state_dict(self):
        return {"eda_rng": self.rng.getstate(), "pool": None if self.pool is None else self.pool.cpu(),
                "matching": self.matching}

    def load_state_dict(self, state):
        self.rng.setstate(_as_tuple(state["eda_rng"]))
        self.pool, self.matching = state["pool"], bool(state["matching"])
