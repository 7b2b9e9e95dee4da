"""BadCLIP's trigger (Liang et al., CVPR 2024): a patch optimised against a clean CLIP.

The patch, pasted at the centre of non-target images, is optimised so that their image
embeddings move close to (1) the target label's text embedding (mean over caption
templates) and (2) the mean embedding of real target-class images: BadCLIP's textual and
visual consistency losses. A patch that already lives where the target lives in the
clean model is learned as a backdoor from few poisoned pairs, and survives fine-tuning
better than a random pattern.
"""
from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from par import models
from par.augment import normalize
from par.data import eval_transform, image_paths, load_templates, mentions_label, open_image, read_csv, to_float
from par.errors import ParError
from par.attacks.base import TRIGGERS, AttackContext, Trigger, check_range, default_patch_size, place_patches
from par.utils import atomic_write, check_device, check_output_file, digest, pick_device, to_pil


def paste_centre(images: torch.Tensor, patch: torch.Tensor) -> torch.Tensor:
    """``images`` with ``patch`` ([1|B, 3, p, p], values in [0, 1]) pasted at the centre; differentiable."""
    _, _, h, w = images.shape
    p = patch.shape[-1]
    if p > min(h, w):
        raise ParError(f"badclip: patch of {p} px does not fit in {h}x{w} images")
    top, left = (h - p) // 2, (w - p) // 2
    pad = (left, w - left - p, top, h - top - p)
    mask = F.pad(torch.ones(1, 1, p, p, device=images.device, dtype=images.dtype), pad)
    return (1 - mask) * images + mask * F.pad(patch.to(images), pad)


def badclip_loss(image_features: torch.Tensor, text_target: torch.Tensor, image_target: torch.Tensor,
                 visual_weight: float = 1.0) -> torch.Tensor:
    """``(1 - cos(f, text_target)) + visual_weight * (1 - cos(f, image_target))``, batch mean."""
    f = F.normalize(image_features, dim=-1)
    text_term = 1 - f @ F.normalize(text_target, dim=-1)
    image_term = 1 - f @ F.normalize(image_target, dim=-1)
    return (text_term + visual_weight * image_term).mean()


@dataclass
class BadCLIPConfig:
    checkpoint: str
    model: str
    data: str  # image,caption CSV of clean pairs
    label: str
    out: str  # patch PNG
    image_root: Optional[str] = None
    templates: str = "openai"
    patch_size: Optional[int] = None  # None: 16 px at 224, scaled to the model's input
    steps: int = 200
    batch_size: int = 64
    lr: float = 0.01
    visual_weight: float = 1.0
    max_images: int = 2048
    seed: int = 0
    device: str = "auto"
    progress: bool = True

    def __post_init__(self):
        """Settings checked where they live, before the model is loaded."""
        for name, low in (("steps", 1), ("batch_size", 1), ("max_images", 1), ("seed", 0), ("patch_size", 1)):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low):
                raise ParError(f"badclip {name} must be a whole number of at least {low}, got {value!r}")
        for name, low_open in (("lr", True), ("visual_weight", False)):
            value = getattr(self, name)
            if (isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)
                    or value < 0 or (low_open and value == 0)):
                raise ParError(f"badclip {name} must be a finite number {'above' if low_open else 'of at least'} 0, "
                               f"got {value!r}")
        check_device(self.device)


def optimise_patch(model, images: torch.Tensor, target_images: torch.Tensor, text_target: torch.Tensor,
                   patch_size: int, steps: int, lr: float, batch_size: int, mean, std, visual_weight: float = 1.0,
                   seed: int = 0, progress: bool = False) -> tuple:
    """Optimises a patch by Adam on ``images`` (float [0, 1]); returns (patch, losses per step)."""
    from tqdm import tqdm


    device = text_target.device
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        image_target = model.encode_image(normalize(target_images.to(device), mean, std), normalize=True).mean(0)
    patch = torch.rand(1, 3, patch_size, patch_size, generator=g).to(device).requires_grad_(True)
    optimizer = torch.optim.Adam([patch], lr=lr)
    losses: List[float] = []
    for _ in tqdm(range(steps), desc="badclip patch", unit="step", disable=not progress):
        idx = torch.randint(0, images.shape[0], (min(batch_size, images.shape[0]),), generator=g)
        batch = paste_centre(images[idx].to(device), patch)
        features = model.encode_image(normalize(batch, mean, std))
        loss = badclip_loss(features, text_target, image_target, visual_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            patch.clamp_(0, 1)
        losses.append(loss.item())
    return patch.detach().cpu(), losses


def make_badclip_patch(cfg: BadCLIPConfig) -> Path:
    check_output_file(cfg.out, "badclip patch")
    if Path(cfg.out).suffix.lower() != ".png":  # a lossless file, known before the optimisation, not at its end
        raise ParError(f"badclip patch: --out must be a .png file, got {cfg.out}")
    device = pick_device(cfg.device)
    model = models.load_model(cfg.model, cfg.checkpoint, device).requires_grad_(False)
    size = models.image_size(model)
    mean, std = models.image_mean_std(model)
    frame = read_csv(cfg.data, ["image", "caption"])
    paths = image_paths(frame, cfg.data, cfg.image_root)
    is_target = [mentions_label(c, cfg.label) for c in frame["caption"].astype(str)]
    target_rows = [i for i, t in enumerate(is_target) if t][: cfg.max_images]
    other_rows = [i for i, t in enumerate(is_target) if not t][: cfg.max_images]
    if not target_rows:
        raise ParError(f"no caption in {cfg.data} mentions {cfg.label!r}: BadCLIP needs real target images")
    if not other_rows:
        raise ParError(f"every caption in {cfg.data} mentions {cfg.label!r}: no images to carry the patch")
    transform = eval_transform(size)
    load = lambda rows: to_float(torch.stack([transform(open_image(paths[i])) for i in rows]))  # noqa: E731
    tokenizer = models.get_tokenizer(cfg.model)
    texts = [t(cfg.label) if callable(t) else t.format(cfg.label) for t in load_templates(cfg.templates)]
    with torch.no_grad():
        text_target = model.encode_text(tokenizer(texts).to(device), normalize=True).mean(0)
    patch, losses = optimise_patch(
        model, load(other_rows), load(target_rows), text_target, cfg.patch_size or default_patch_size(size),
        cfg.steps, cfg.lr, cfg.batch_size, mean, std, cfg.visual_weight, cfg.seed, cfg.progress,
    )
    out = atomic_write(cfg.out, to_pil(patch[0]).save)
    print(f"badclip patch: {out} (loss {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} steps)")
    return out


@TRIGGERS.register("badclip")
@dataclass
class BadCLIP(Trigger):
    """BadCLIP: a patch optimised against a clean CLIP (``python -m par badclip``), at the centre.

    When no ``patch`` is given, ``prepare``
    optimises one against the context's clean CLIP (cached by what it depends on).
    """

    name = "badclip"
    paper_name = "BadCLIP"
    random = False
    patch: Optional[str] = None  # PNG written by `python -m par badclip`
    patch_size: Optional[int] = None  # None: 16 px at 224, scaled

    def check(self):
        super().check()
        check_range(self, "patch_size", 1)
        if self.patch is not None and not Path(self.patch).is_file():
            raise ParError(f"badclip patch not found: {self.patch} (make one with `python -m par badclip`)")

    # what a profile's attack_prepare may set: the patch's optimisation, not what the pipeline supplies
    PREPARE_SETTINGS = ("steps", "batch_size", "lr", "visual_weight", "max_images", "seed", "device")

    @classmethod
    def check_prepare(cls, settings: dict) -> None:
        unknown = sorted(set(settings) - set(cls.PREPARE_SETTINGS))
        if unknown:
            raise ParError(f"badclip attack_prepare has unknown setting(s) {unknown}; it sets the patch's "
                           f"optimisation: {', '.join(cls.PREPARE_SETTINGS)}")
        BadCLIPConfig(checkpoint="-", model="-", data="-", label="-", out="-", **settings)  # their values

    def prepare(self, context: AttackContext) -> dict:
        if self.patch:
            return {}
        # BadCLIPConfig's defaults, in the key the cached patch is named by
        values = {"steps": BadCLIPConfig.steps, "lr": BadCLIPConfig.lr, "batch_size": BadCLIPConfig.batch_size,
                  **({"patch_size": self.patch_size} if self.patch_size else {}),  # optimised at the size planted
                  **context.settings}
        checkpoint, key = context.clean_checkpoint()
        patch = Path(context.workdir) / f"badclip-patch-{digest([key, context.label, values])}.png"
        if not patch.exists():
            make_badclip_patch(BadCLIPConfig(checkpoint=str(checkpoint), model=context.model, data=context.clean_data,
                                             label=context.label, out=str(patch), templates=context.templates,
                                             **values))
        return {"patch": str(patch)}

    def draw(self, images, generator):
        if not self.patch:
            raise ParError("badclip needs its optimised patch: --attack-param patch=PATH (make one with `python -m par badclip`)")
        _, _, h, w = images.shape
        size = self.patch_size or default_patch_size(min(h, w))
        if size > min(h, w):
            raise ParError(f"badclip: patch of {size} px does not fit in {h}x{w} images")
        patch = _load_patch(self.patch)
        if patch.shape[-1] != size:
            patch = F.interpolate(patch, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
        mask, pattern = place_patches(patch, torch.tensor([(h - size) // 2]), torch.tensor([(w - size) // 2]), h, w)
        return mask, pattern, 1.0


@functools.lru_cache(maxsize=8)
def _load_patch(path: str) -> torch.Tensor:

    image = open_image(Path(path))
    if image.width != image.height:
        raise ParError(f"badclip patch {path} must be square, got {image.width}x{image.height}")
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None].float() / 255
