"""Adversarial robustness: one PGD for training (FARE, TeCoA) and robust zero-shot accuracy (APGD).

Everything here works in pixel space: images are float ``[0, 1]`` tensors and the attacked
function normalises inside, so an ``eps`` means the same thing for every encoder. Robust
accuracy runs the first two attacks of AutoAttack's standard version, in its order, with the maintained
``torchattacks`` implementations (RobustVLM's protocol): APGD-CE on every image, then APGD-T (DLR loss,
9 target classes) on those still classified correctly; an image is robust only if it survives every
attack. Without FAB-T and Square it is an upper bound on AutoAttack's robust accuracy.
"""
from __future__ import annotations

from fractions import Fraction
from typing import Callable, Dict, Optional, Sequence

import torch

from par.augment import normalize
from par.errors import ParError
from par.registry import Registry


def parse_eps(text, what: str = "eps") -> float:
    """``"4/255"``, ``"0.0157"`` or a number, as a float in (0, 1]; anything else is a clear error."""
    if isinstance(text, bool):
        raise ParError(f"{what} must be a number or a fraction like 4/255, got {text!r}")
    try:
        value = float(Fraction(str(text).strip()))
    except (ValueError, ZeroDivisionError):
        raise ParError(f"{what} must be a number or a fraction like 4/255, got {text!r}") from None
    if not 0 < value <= 1:
        raise ParError(f"{what} must be in (0, 1] (pixels are in [0, 1]), got {text!r}")
    return value


def eps_label(eps: float) -> str:
    """``4/255`` when eps is a whole number of 255ths (how the field writes it), else the number."""
    steps = eps * 255
    return f"{round(steps)}/255" if eps > 0 and abs(steps - round(steps)) < 1e-6 else f"{eps:g}"


def pgd(loss: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, eps: float, steps: int,
        step_size: float, random_start: bool = True, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """L-inf PGD that *maximises* ``loss(x)`` (a scalar) over ``||x - images||_inf <= eps``, ``x`` in [0, 1].

    Gradients are taken with respect to the perturbation only (``torch.autograd.grad``): the
    parameters of the attacked model collect nothing. Returns the detached adversarial images.
    """
    images = images.detach()
    if random_start:
        noise = torch.rand(images.shape, generator=generator, device="cpu").to(images.device)
        delta = (2 * noise - 1) * eps
    else:
        delta = torch.zeros_like(images)
    delta = ((images + delta).clamp(0, 1) - images).float()
    for _ in range(steps):
        delta.requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(loss(images + delta), delta)
        delta = (delta.detach() + step_size * grad.sign()).clamp(-eps, eps)
        delta = (images + delta).clamp(0, 1) - images
    return (images + delta).detach()


class ZeroShotLogits(torch.nn.Module):
    """``[0, 1]`` images -> zero-shot logits: the whole pipeline an attacker faces (normalisation inside)."""

    def __init__(self, model, classifier: torch.Tensor, mean, std):
        super().__init__()
        self.model, self.mean, self.std = model, mean, std
        # cloned: a classifier built under inference mode cannot be saved for the attack's backward pass
        self.register_buffer("classifier", classifier.detach().float().clone())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.model.encode_image(normalize(images, self.mean, self.std), normalize=True).float()
        return 100.0 * features @ self.classifier  # CLIP's temperature at its cap: APGD's DLR is scale-free


ROBUST_ATTACKS: Registry = Registry("robust attack")


def _torchattacks():
    try:
        import torchattacks
    except ImportError:
        raise ParError("robust evaluation needs torchattacks: pip install scipy && pip install --no-deps "
                       "torchattacks (scripts/setup.sh does this)") from None
    return torchattacks


@ROBUST_ATTACKS.register("apgd-ce", "apgd")
def apgd_ce(logits_fn, images, labels, eps, steps, seed):
    """APGD with the cross-entropy loss (torchattacks)."""
    torchattacks = _torchattacks()
    return torchattacks.APGD(logits_fn, norm="Linf", eps=eps, steps=steps, n_restarts=1, seed=seed, loss="ce")(images, labels)


@ROBUST_ATTACKS.register("apgd-t", "apgd-dlr-t")
def apgd_t(logits_fn, images, labels, eps, steps, seed):
    """Targeted APGD with the DLR loss on the 9 most likely other classes (fewer with fewer classes)."""
    torchattacks = _torchattacks()

    classes = logits_fn.classifier.shape[1]
    return torchattacks.APGDT(logits_fn, norm="Linf", eps=eps, steps=steps, n_restarts=1, seed=seed,
                              n_classes=min(classes, 10))(images, labels)


@ROBUST_ATTACKS.register("pgd")
def pgd_ce(logits_fn, images, labels, eps, steps, seed):
    """Plain PGD on the cross-entropy, step eps/4, random start: the baseline APGD must beat."""
    generator = torch.Generator().manual_seed(seed)
    ce = torch.nn.functional.cross_entropy
    return pgd(lambda x: ce(logits_fn(x), labels, reduction="sum"), images, eps, steps, eps / 4, True, generator)


def robust_accuracy(logits_fn: ZeroShotLogits, loader, device, eps: float,
                    attacks: Sequence[str] = ("apgd-ce", "apgd-t"), steps: int = 100, max_images: int = 1000,
                    seed: int = 0, progress: bool = True, attack_batch: Optional[int] = None) -> Dict[str, float]:
    """Top-1 accuracy under the attacks in order, each run on the images still correct (AutoAttack's cascade),
    at most ``attack_batch`` images at once (default: the loader's batches whole; an attack keeps every
    image's activations for its gradient: a ViT-L at 336 px needs ~1 GB per image).

    Returns ``clean`` (on the same images), ``robust`` (worst case over the attacks) and, per
    attack, the accuracy after it alone was added to the cascade (``after_<attack>``), plus ``images``.
    """
    from tqdm import tqdm

    if not 0 <= eps <= 1:
        raise ParError(f"eps must be in [0, 1], got {eps}")
    names = [ROBUST_ATTACKS.canonical(a) for a in attacks]
    classes = logits_fn.classifier.shape[1]
    if "apgd-t" in names and classes < 4:  # its DLR loss reads the 4th-largest logit
        raise ParError(f"apgd-t needs at least 4 classes, the classifier has {classes}; attack with apgd-ce alone")
    was_training = logits_fn.model.training
    logits_fn.eval()
    clean_correct, robust = [], []
    after = {name: [] for name in names}
    seen = 0
    for images, labels in tqdm(loader, desc=f"robust eps {eps_label(eps)}", unit="batch", leave=False,
                               disable=not progress):
        if seen >= max_images:
            break
        images, labels = images[: max_images - seen], labels[: max_images - seen]
        seen += images.shape[0]
        x = images.to(device).float().div(255.0) if images.dtype == torch.uint8 else images.to(device)
        y = torch.as_tensor(labels).to(device)
        with torch.no_grad():
            correct = logits_fn(x).argmax(dim=1) == y
        clean_correct.append(correct.cpu())
        alive = correct.clone()
        for name in names:
            alive_now = alive.nonzero().flatten()
            for index in alive_now.split(attack_batch or len(alive_now)) if len(alive_now) and eps > 0 else ():
                try:
                    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
                        # torchattacks' APGD seeds torch's global streams: the caller's draws go on unchanged
                        adversarial = ROBUST_ATTACKS.get(name)(logits_fn, x[index], y[index], eps, steps, seed)
                except torch.cuda.OutOfMemoryError:
                    raise ParError(f"robust evaluation ran out of device memory attacking {len(index)} images at "
                                   "once: lower robust_batch_size (--robust-batch-size, ROBUST_BATCH_SIZE)") from None
                with torch.no_grad():
                    alive[index] = logits_fn(adversarial).argmax(dim=1) == y[index]
            after[name].append(alive.cpu().clone())
        robust.append(alive.cpu())
    logits_fn.model.train(was_training)
    if not seen:
        raise ParError("robust evaluation got no images")
    mean = lambda parts: torch.cat(parts).float().mean().item()  # noqa: E731
    return {"clean": mean(clean_correct), "robust": mean(robust), "images": seen,
            **{f"after_{name}": mean(parts) for name, parts in after.items()}}
