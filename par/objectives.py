"""Training objectives as tasks, found by name: the only thing pre-training and each fine-tuning defense change.

An objective (the shape of open_clip's ``TrainingTask``) owns everything about itself that the
loop must not know: its typed settings (``Params``, filled from the config's
``objective_params``), which of the model's parameters train, its frozen reference model if it
has one, its random state (saved in resumable states), and hooks the loop calls for every
objective alike (``after_step``, ``on_epoch_start``). The loop only calls
``objective(model, batch)`` and logs the terms it returns.

``clip`` (alias ``ft``) is the plain CLIP loss: pre-training, or the plain fine-tuning baseline.
``par`` is PAR (docs/PAR-NOTES.md section 1). ``cleanclip`` is CleanCLIP (section 9); ``roclip`` is RoCLIP.
``fare`` and ``tecoa`` are adversarial fine-tuning of the vision tower (FARE, RobustVLM). A new
objective is a registered subclass, here or in a plugin (``par.plugins``).

Every objective runs the trainable model through one forward call of ``model`` (the DDP
wrapper when distributed), so gradients are synchronised. What the loop wraps and calls is
the objective's ``step_module`` of the CLIP model: the model itself, or a part of it (FARE's
image tower, whose un-normalised embeddings CLIP's own forward does not return).
"""
from __future__ import annotations

import copy
import math
import random
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import torch

from par.augment import normalize
from par.config import build
from par.data import to_float
from par.losses import par_terms
from par.errors import ParError
from par.models import image_size
from par.registry import Registry
from par.robust import pgd
from par.text_augment import eda_batch

OBJECTIVES: Registry = Registry("objective")


@dataclass
class Batch:
    images: torch.Tensor  # augmented and normalised, on the device
    tokens: torch.Tensor
    raw_images: torch.Tensor  # uint8, as decoded, on the device
    captions: Optional[List[str]] = None
    labels: Optional[torch.Tensor] = None  # class indices, when the training data is labelled (a class-folder tree)


@dataclass
class TaskContext:
    """What the loop hands every objective: the shared pieces it may build terms from."""

    contrastive: Any  # open_clip ClipLoss over the global batch
    tokenizer: Any = None
    mean: Sequence[float] = (0.0, 0.0, 0.0)
    std: Sequence[float] = (1.0, 1.0, 1.0)
    seed: int = 0  # this process's seed
    reduce_mean: Any = None  # local batch mean -> global mean (distributed); None in one process


@dataclass
class ObjectiveParams:
    # the temperature: learnt when pre-training; PAR and the fine-tuning baselines keep it fixed
    train_logit_scale: bool = True


class Objective:
    """Base task: trains every parameter (and the temperature when asked), clamps it like CLIP."""

    Params = ObjectiveParams
    needs_frozen = False  # cleans a checkpoint against a frozen copy of it
    needs_labels = False  # trains on class labels (a class-folder tree, or a CSV with a label column)

    def __init__(self, model: torch.nn.Module, params: ObjectiveParams, context: TaskContext):
        self.params, self.context = params, context
        self.frozen = copy.deepcopy(model).eval().requires_grad_(False) if self.needs_frozen else None
        self.select_trainable(model)

    def select_trainable(self, model: torch.nn.Module) -> None:
        """Sets ``requires_grad`` on the parameters this objective trains (called before DDP wraps the model)."""
        model.logit_scale.requires_grad_(self.params.train_logit_scale)

    def step_module(self, model: torch.nn.Module) -> torch.nn.Module:
        """What the loop wraps (DDP, compile) and passes to ``__call__``: by default the CLIP model."""
        return model

    def __call__(self, model, batch: Batch) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def after_step(self, model: torch.nn.Module) -> None:
        """After each optimiser step: CLIP's cap on the temperature (logit scale at most 100)."""
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))

    def on_epoch_start(self, epoch: int) -> None:
        pass

    def state_dict(self) -> dict:
        """Random state and anything else a resumed run needs (plain values and tensors only)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def plot_guides(self) -> dict:
        """Reference lines for the training plot, e.g. PAR's threshold on the embedding distance."""
        return {}


def objective_params(name: str, values: Optional[dict] = None) -> ObjectiveParams:
    """The typed settings of objective ``name`` from a config's ``objective_params`` mapping."""
    cls = OBJECTIVES.get(name)
    return build(cls.Params, dict(values or {}), f"objective_params of {OBJECTIVES.canonical(name)!r}")


def make_objective(name: str, values: Optional[dict], model: torch.nn.Module, context: TaskContext) -> Objective:
    return OBJECTIVES.get(name)(model, objective_params(name, values), context)


@OBJECTIVES.register("clip", "ft")
class ClipObjective(Objective):
    """The symmetric InfoNCE loss of CLIP over the (global) batch."""

    def __call__(self, model, batch):
        image, text, scale = model(batch.images, batch.tokens)
        return {"loss": self.context.contrastive(image, text, scale)}


@dataclass
class PARParams(ObjectiveParams):
    tau: float = 2.15  # threshold on the batch-mean squared embedding distance to the frozen model
    train_logit_scale: bool = False  # PAR treats the temperature as a constant


@OBJECTIVES.register("par")
class PARObjective(Objective):
    """CLIP loss minus the thresholded distance to the frozen poisoned model."""

    Params = PARParams
    needs_frozen = True

    def __call__(self, model, batch):

        image, text, scale = model(batch.images, batch.tokens)
        with torch.no_grad():
            frozen_image, frozen_text, _ = self.frozen(batch.images, batch.tokens)
        # distributed: the threshold is decided on the global batch mean, as in a single process
        return par_terms(image, text, frozen_image, frozen_text, scale, self.params.tau, self.context.contrastive,
                         self.context.reduce_mean)

    def plot_guides(self):
        return {"distance_threshold": self.params.tau}


@dataclass
class CleanCLIPParams(ObjectiveParams):
    unimodal_weight: float = 1.0  # lambda: weight of the image-image and text-text terms
    train_logit_scale: bool = False


@OBJECTIVES.register("cleanclip")
class CleanCLIPObjective(Objective):
    """CLIP loss + lambda/2 * (InfoNCE(image, AutoAugment(image)) + InfoNCE(caption, EDA(caption)))."""

    Params = CleanCLIPParams

    def __init__(self, model, params, context):
        from torchvision.transforms import AutoAugment

        super().__init__(model, params, context)
        self.autoaugment = AutoAugment()
        self.rng = random.Random(context.seed)  # EDA's choices

    def __call__(self, model, batch):

        if batch.captions is None:
            raise RuntimeError("cleanclip needs the batch's captions")
        ctx = self.context
        augmented = torch.stack([self.autoaugment(img) for img in batch.raw_images])  # per image, on the device
        aug_images = normalize(to_float(augmented), ctx.mean, ctx.std)
        aug_tokens = ctx.tokenizer(eda_batch(batch.captions, self.rng)).to(batch.tokens.device)
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


@dataclass
class RoCLIPParams(ObjectiveParams):
    pool_size: int = 131072  # caption embeddings kept, newest first (RoCLIP's pool, FIFO)
    match_every: int = 2  # every match_every-th epoch contrasts images with their nearest pool captions
    augment: bool = True  # RoCLIP's image augmentations (crop, flip, colour jitter, greyscale) and EDA captions
    train_logit_scale: bool = False


def nearest_captions(images: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
    """For each (normalised) image embedding, the pool's caption embedding of highest cosine similarity."""
    similarity = images @ torch.nn.functional.normalize(pool, dim=-1).T
    return pool[similarity.argmax(dim=1)]


@OBJECTIVES.register("roclip")
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
        if params.pool_size < 1 or params.match_every < 1:
            raise ValueError("roclip: pool_size and match_every must be at least 1")
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
            if batch.captions is None:
                raise RuntimeError("roclip needs the batch's captions")
            augmented = torch.stack([self.image_augment(img) for img in batch.raw_images])  # on the device
            images = normalize(to_float(augmented), ctx.mean, ctx.std)
            tokens = ctx.tokenizer(eda_batch(batch.captions, self.rng)).to(tokens.device)
        image, text, scale = model(images, tokens)
        matched = self.matching and self.pool is not None
        if matched:
            neighbours = nearest_captions(image.detach(), self.pool.to(image.device))
            # the text tower has no term this step; the zero keeps DDP's every-parameter-used check happy
            loss = ctx.contrastive(image, neighbours, scale) + 0.0 * text.sum()
        else:
            loss = ctx.contrastive(image, text, scale)
        fresh = text.detach().float()  # the pool stays on the device (up to 131,072 x width floats)
        self.pool = fresh if self.pool is None else torch.cat([fresh, self.pool.to(fresh.device)])[: self.params.pool_size]
        return {"loss": loss, "matched": torch.tensor(float(matched), device=loss.device)}

    def state_dict(self):
        return {"eda_rng": self.rng.getstate(), "pool": None if self.pool is None else self.pool.cpu(),
                "matching": self.matching}

    def load_state_dict(self, state):
        self.rng.setstate(_as_tuple(state["eda_rng"]))
        self.pool, self.matching = state["pool"], bool(state["matching"])


class ImageTower(torch.nn.Module):
    """The CLIP model's image encoder as a module of its own: ``images -> un-normalised embeddings``.

    Holds the whole CLIP model (the loop saves and evaluates that), but its forward touches only
    the vision tower, so DDP synchronises exactly the parameters that train.
    """

    def __init__(self, clip: torch.nn.Module):
        super().__init__()
        self.clip = clip

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(images, normalize=False)


def unwrapped(module: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        inner = getattr(module, "module", None) or getattr(module, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            return module
        module = inner


@dataclass
class AdversarialParams(ObjectiveParams):
    eps: float = 4 / 255  # L-inf radius in [0, 1] pixel space (FARE^4); 2/255 is the other published variant
    steps: int = 10  # PGD steps per training step
    step_size: float = 1 / 255
    random_start: bool = True  # uniform start in the eps-ball, as RobustVLM's training script
    tower: str = "vision"  # what trains: the vision tower only (the text tower stays frozen)
    train_logit_scale: bool = False

    def __post_init__(self):
        name = type(self).__name__.replace("Params", "").lower()
        if self.tower != "vision":
            raise ParError(f"{name} trains only the vision tower (the text tower stays frozen); got tower={self.tower!r}")
        if self.train_logit_scale:
            raise ParError(f"{name} does not train the temperature: set train_logit_scale: false")
        if not 0 < self.eps <= 1 or self.steps < 1 or self.step_size <= 0:
            raise ParError(f"{name}: need 0 < eps <= 1, steps >= 1, step_size > 0; got eps={self.eps}, "
                           f"steps={self.steps}, step_size={self.step_size}")


class AdversarialObjective(Objective):
    """Shared by FARE and TeCoA: only the vision tower trains, PGD attacks the un-augmented images."""

    Params = AdversarialParams

    def __init__(self, model, params, context):
        super().__init__(model, params, context)
        self.generator = torch.Generator().manual_seed(context.seed)  # PGD's random starts

    def select_trainable(self, model):
        model.requires_grad_(False)
        model.visual.requires_grad_(True)

    def step_module(self, model):
        return ImageTower(model)

    def attack(self, tower: ImageTower, images: torch.Tensor, loss) -> torch.Tensor:
        """PGD maximising ``loss(embeddings)`` on ``images`` in [0, 1], with the tower in eval mode."""
        ctx, p = self.context, self.params
        was_training = tower.training
        tower.eval()  # BatchNorm statistics (RN50) are not updated by the attack's passes
        adversarial = pgd(lambda x: loss(tower(normalize(x, ctx.mean, ctx.std))), images, p.eps, p.steps,
                          p.step_size, p.random_start, self.generator)
        tower.train(was_training)
        return adversarial

    def state_dict(self):
        return {"pgd_generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["pgd_generator"])


def squared_distance(embeddings: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """FARE's loss: the batch mean of the squared L2 distance between (un-normalised) embeddings."""
    return (embeddings.float() - targets.float()).pow(2).sum(dim=-1).mean()


@dataclass
class FAREParams(AdversarialParams):
    pass


@OBJECTIVES.register("fare")
class FAREObjective(AdversarialObjective):
    """FARE (Schlarmann, Singh, Croce, Hein, ICML 2024): find delta maximising
    ``||f(x + delta) - f0(x)||^2`` under ``||delta||_inf <= eps`` with PGD, then minimise it.

    ``f0`` is the frozen original (here: the checkpoint being cleaned), embeddings are
    un-normalised, and the adversarial path sees the un-augmented images.
    """

    Params = FAREParams
    needs_frozen = True

    def __call__(self, model, batch):
        ctx = self.context
        images = to_float(batch.raw_images)
        with torch.no_grad():
            targets = self.frozen.encode_image(normalize(images, ctx.mean, ctx.std), normalize=False)
        adversarial = self.attack(unwrapped(model), images, lambda e: squared_distance(e, targets))
        return {"loss": squared_distance(model(normalize(adversarial, ctx.mean, ctx.std)), targets)}


@dataclass
class TeCoAParams(AdversarialParams):
    classnames: str = "imagenet"  # the classes of the training data's labels: file, or "imagenet"
    templates: str = "openai"


@OBJECTIVES.register("tecoa")
class TeCoAObjective(AdversarialObjective):
    """TeCoA (Mao et al., ICLR 2023), the supervised baseline FARE compares against: cross-entropy
    of the zero-shot classifier (built once from the frozen text tower) on PGD images.

    Needs labelled training data: a class-folder tree as ``train_csv``, or a CSV with a ``label`` column
    indexing ``classnames``.
    """

    Params = TeCoAParams
    needs_labels = True

    def __init__(self, model, params, context):
        from par.data import load_classnames, load_templates
        from par.evaluate import zero_shot_classifier

        super().__init__(model, params, context)
        device = next(model.parameters()).device
        self.classnames = load_classnames(params.classnames)
        self.classifier = zero_shot_classifier(model, context.tokenizer, self.classnames,
                                               load_templates(params.templates), device).float().clone()
        # (cloned: the classifier is built in inference mode, and autograd may not save such tensors)

    def __call__(self, model, batch):
        ctx = self.context
        labels = batch.labels
        if int(labels.max()) >= len(self.classnames):
            raise ParError(f"tecoa: label {int(labels.max())} is outside the {len(self.classnames)} classes of "
                           f"{self.params.classnames!r}")
        logits = lambda e: 100.0 * torch.nn.functional.normalize(e.float(), dim=-1) @ self.classifier  # noqa: E731
        ce = torch.nn.functional.cross_entropy
        adversarial = self.attack(unwrapped(model), to_float(batch.raw_images), lambda e: ce(logits(e), labels))
        return {"loss": ce(logits(model(normalize(adversarial, ctx.mean, ctx.std))), labels)}


def _as_tuple(value):
    """``random.Random`` states come back from a checkpoint as lists; ``setstate`` wants tuples."""
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value
