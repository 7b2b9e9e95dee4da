"""Adversarial fine-tuning of the vision tower: FARE (unsupervised, embedding-level) and TeCoA (supervised)."""
from __future__ import annotations


from dataclasses import dataclass

import torch

from par.augment import normalize
from par.data import to_float
from par.defenses.base import Objective, ObjectiveParams
from par.defenses.finetune import defense
from par.errors import ParError
from par.eval.robust import pgd
from par.utils import unscaled_precision


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
        try:  # in the step's precision, but not fp16: the attack's input gradients are not scaled
            with unscaled_precision(images.device):
                return pgd(lambda x: loss(tower(normalize(x, ctx.mean, ctx.std))), images, p.eps, p.steps,
                           p.step_size, p.random_start, self.generator)
        finally:  # also when the attack fails (out of memory, say): the tower trains on as it did
            tower.train(was_training)

    def state_dict(self):
        return {"pgd_generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["pgd_generator"])


def fare_loss(embeddings: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """FARE's loss: the batch mean of the squared L2 distance between (un-normalised) embeddings."""
    return (embeddings.float() - targets.float()).pow(2).sum(dim=-1).mean()


@dataclass
class FAREParams(AdversarialParams):
    pass


@defense("fare")
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
        adversarial = self.attack(unwrapped(model), images, lambda e: fare_loss(e, targets))
        return {"loss": fare_loss(model(normalize(adversarial, ctx.mean, ctx.std)), targets)}


@dataclass
class TeCoAParams(AdversarialParams):
    classnames: str = "imagenet"  # the classes of the training data's labels: file, or "imagenet"
    templates: str = "openai"


@defense("tecoa")
class TeCoAObjective(AdversarialObjective):
    """TeCoA (Mao et al., ICLR 2023), the supervised baseline FARE compares against: cross-entropy
    of the zero-shot classifier (built once from the frozen text tower) on PGD images.

    Needs labelled training data: a class-folder tree as ``train_data``, or a CSV with a ``label`` column
    indexing ``classnames``.
    """

    Params = TeCoAParams
    needs_labels = True

    def __init__(self, model, params, context):
        from par.data import load_classnames, load_templates
        from par.eval.zeroshot import zero_shot_classifier

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
        def logits(e):  # in fp32 under the step's autocast: bf16 would round 100 x cosine by up to 0.4
            with torch.autocast(e.device.type, enabled=False):
                return 100.0 * torch.nn.functional.normalize(e.float(), dim=-1) @ self.classifier

        ce = torch.nn.functional.cross_entropy
        adversarial = self.attack(unwrapped(model), to_float(batch.raw_images), lambda e: ce(logits(e), labels))
        return {"loss": ce(logits(model(normalize(adversarial, ctx.mean, ctx.std))), labels)}
