"""Zero-shot clean accuracy (CA) and attack success rate (ASR), PAR-NOTES section 5.

Clean and triggered evaluation share one code path: images are decoded and resized once
per batch, the trigger (if any) is applied to the ``[0, 1]`` batch, then the batch is
normalised and classified against class embeddings built from templates by open_clip's
``build_zero_shot_classifier``. ASR counts only images whose true class is not the
target (the reference code forgets that exclusion).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from par.errors import ParError


def load_templates(spec: str) -> Sequence:
    """``openai`` for open_clip's 80 ImageNet templates, or a file of ``{}`` templates, one per line."""
    if spec == "openai":
        from open_clip import OPENAI_IMAGENET_TEMPLATES

        return OPENAI_IMAGENET_TEMPLATES
    from par.data import read_lines

    templates = read_lines(spec, "templates")
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise ParError(f"templates in {spec} must contain '{{}}' where the class name goes; not: {bad[:3]}")
    return templates


def zero_shot_classifier(model, tokenizer, classnames: Sequence[str], templates: Sequence, device) -> torch.Tensor:
    """``[embed_dim, num_classes]``: per class, the renormalised mean of its normalised template embeddings."""
    from open_clip import build_zero_shot_classifier

    with torch.inference_mode():
        return build_zero_shot_classifier(
            model, tokenizer=tokenizer, classnames=classnames, templates=templates,
            num_classes_per_batch=10, device=device, use_tqdm=False,
        )


@torch.inference_mode()
def predict(model, classifier, loader, mean, std, device, trigger=None, seed: int = 0, topk: int = 5, desc="eval",
            progress: bool = True):
    """Top-``topk`` class predictions and true labels; ``trigger`` is applied before normalising."""
    from tqdm import tqdm

    from par.augment import normalize
    from par.data import to_float

    top, labels = [], []
    k = min(topk, classifier.shape[1])
    for batch, (images, target) in enumerate(tqdm(loader, desc=desc, unit="batch", leave=False, disable=not progress)):
        images = to_float(images.to(device))
        if trigger is not None:
            images = trigger.apply(images, torch.Generator().manual_seed(seed + batch))
        features = model.encode_image(normalize(images, mean, std), normalize=True)
        top.append((features @ classifier).topk(k, dim=-1).indices.cpu())
        labels.append(target.cpu())
    return torch.cat(top), torch.cat(labels)


def clean_accuracy(top_predictions: torch.Tensor, labels: torch.Tensor, k: int = 1) -> float:
    """Share of images whose true class is among the top-``k`` predictions."""
    return (top_predictions[:, :k] == labels[:, None]).any(dim=1).float().mean().item()


def attack_success_rate(top_predictions: torch.Tensor, labels: torch.Tensor, target: int, k: int = 1) -> float:
    """Share of triggered images *not of the target class* whose top-``k`` predictions contain the target."""
    keep = labels != target
    if not keep.any():
        raise ParError("no test image outside the target class: ASR is undefined")
    return (top_predictions[keep, :k] == target).any(dim=1).float().mean().item()


@dataclass
class EvalConfig:
    checkpoint: str
    model: str
    data: str  # image,label CSV
    classnames: str
    templates: str = "openai"
    image_root: Optional[str] = None
    attack: Optional[str] = None
    label: Optional[str] = None
    attack_params: dict = field(default_factory=dict)  # e.g. {"patch_size": 8}
    seed: int = 0
    batch_size: int = 256
    workers: int = 0
    device: str = "auto"
    out: Optional[str] = None  # JSON results file
    progress: bool = True


def evaluate(cfg: EvalConfig) -> dict:
    """CA (and, with an attack, ASR) of a checkpoint; returns the record also written to ``cfg.out``."""
    from par import models, triggers
    from par.data import LabelledImageDataset, read_lines
    from par.train import pick_device

    start = time.time()
    classnames = read_lines(cfg.classnames, "class names")
    templates = load_templates(cfg.templates)
    trigger, target = None, None
    if cfg.attack:
        if cfg.label is None:
            raise ParError("an attack needs the target --label")
        trigger = triggers.get_trigger(cfg.attack, **cfg.attack_params)
        if cfg.label not in classnames:
            raise ParError(f"target label {cfg.label!r} is not a class in {cfg.classnames}")
        target = classnames.index(cfg.label)
    device = pick_device(cfg.device)
    model = models.load_model(cfg.model, cfg.checkpoint, device)  # raises before any evaluation if weights fail
    mean, std = models.image_mean_std(model)
    dataset = LabelledImageDataset(cfg.data, len(classnames), models.image_size(model), cfg.image_root)
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, num_workers=cfg.workers)
    classifier = zero_shot_classifier(model, models.get_tokenizer(cfg.model), classnames, templates, device)

    top, labels = predict(model, classifier, loader, mean, std, device, desc="clean", progress=cfg.progress)
    metrics = {"clean_top1": clean_accuracy(top, labels, 1), "clean_top5": clean_accuracy(top, labels, 5)}
    if trigger is not None:
        top_t, labels_t = predict(model, classifier, loader, mean, std, device, trigger, cfg.seed,
                                   desc=cfg.attack, progress=cfg.progress)
        metrics["asr_top1"] = attack_success_rate(top_t, labels_t, target, 1)
        metrics["asr_top5"] = attack_success_rate(top_t, labels_t, target, 5)
    record = {
        "checkpoint": str(cfg.checkpoint), "model": models.canonical_model_name(cfg.model), "data": str(cfg.data),
        "num_images": len(dataset), "num_classes": len(classnames),
        "attack": trigger.name if trigger else None, "attack_params": trigger.params() if trigger else None,
        "label": cfg.label, "seed": cfg.seed, "metrics": metrics, "seconds": round(time.time() - start, 2),
    }
    if cfg.out:
        out = Path(cfg.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        os.replace(tmp, out)
    return record
