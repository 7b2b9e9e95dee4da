"""One scan of one checkpoint: every input checked before any work, then the scanner run.

``scan_checkpoint(ScanConfig) -> ScanResult``. The order of the checks is the order of their cost:
settings, scanner and its parameters, class names, templates and candidate labels, the image list,
the encoder (a checkpoint saved for another encoder is refused by its metadata before its weights
are read), every shadow image decoded, then the weights (strictly: any key mismatch is an error;
non-finite weights are refused). ``scan_request`` is what makes two scans the same scan (settings and
the digests of the checkpoint, the bytes of the images used, class names and templates), for reusing
finished ones; it runs the checks first, so no checkpoint is hashed for a request that would be refused.
"""
from __future__ import annotations

import math
import numbers
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from par import models
from par.data import class_key, load_classnames, load_templates, target_index
from par.errors import ParError
from par.eval.zeroshot import zero_shot_classifier
from par.scan.base import SCANNERS, InvertedTrigger, ScanContext, ScanResult, Scanner, make_scanner
from par.scan.images import decode, list_images, select
from par.utils import (PRECISIONS, autocast, check_device, digest, file_digest, inference_precision, path_digest,
                       pick_device)

EXAMPLES = 8  # clean images kept in the result, to show the trigger on


@dataclass
class ScanConfig:
    checkpoint: str
    model: str
    images: str  # CSV with an 'image' column, or a folder of image files (unlabelled)
    scanner: str = "label-inversion"
    scanner_params: dict = field(default_factory=dict)
    classnames: str = "imagenet"  # file, or "imagenet" (label scanners)
    templates: str = "openai"  # "openai", or a file of '{}' templates (label scanners)
    labels: Optional[List[str]] = None  # candidate labels (default: every class name)
    top_k: int = 10  # label scanners invert only the top_k candidates of a cheap ranking pass
    max_images: int = 128  # shadow images used (a seeded sample of the sorted list when there are more)
    threshold: Optional[float] = None  # None: the scanner's documented threshold
    image_root: Optional[str] = None  # folder a CSV's image paths are relative to (default: the CSV's)
    seed: int = 0
    device: str = "auto"
    # the image and text towers' autocast; "auto": bf16 on CUDA (a 1,000-label scan is ~6M stamped images),
    # exact fp32 on the CPU, as evaluation does
    precision: str = "auto"
    progress: bool = True

    def __post_init__(self):
        for name, low in (("top_k", 1), ("max_images", 1), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
                raise ParError(f"scan {name} must be a whole number of at least {low}, got {value!r}")
        check_device(self.device)
        if self.threshold is not None and (isinstance(self.threshold, bool) or not isinstance(self.threshold, numbers.Real)
                                           or not math.isfinite(self.threshold)):
            raise ParError(f"scan threshold must be a finite number, got {self.threshold!r}")
        if self.precision not in ("auto", *PRECISIONS):
            raise ParError(f"scan precision must be auto or one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.labels is not None:
            labels = [str(label).strip() for label in self.labels]
            if not labels or not all(labels):
                raise ParError(f"scan labels must be non-empty class names, got {self.labels!r}")
            twice = sorted({label for label in labels if labels.count(label) > 1})
            if twice:
                raise ParError(f"scan labels list {twice} more than once")
            self.labels = labels


def first_of_each_name(classnames: List[str]) -> List[int]:
    """The indices of the class names, a name listed again left out: the built-in ImageNet list (OpenAI's)
    names ``missile`` and ``sunglasses`` twice each, and twin columns of the zero-shot classifier would lift
    each other's trigger (the scan's pull) and tie under argmax, the later twin never reached."""
    seen, indices = set(), []
    for i, name in enumerate(classnames):
        key = class_key(name)
        if key not in seen:
            seen.add(key)
            indices.append(i)
    return indices


def left_out(classnames: List[str], candidates: List[int]) -> List[str]:
    """The class names not among the candidates (an ImageNet twin's second listing)."""
    kept = set(candidates)
    return [name for i, name in enumerate(classnames) if i not in kept]


def _label_space(cfg: ScanConfig, scanner: Scanner) -> Tuple[Optional[List[str]], Optional[list], Optional[List[int]]]:
    """(class names, templates, candidate indices) for a label scanner; Nones for the others."""
    if not scanner.uses_labels:
        return None, None, None
    classnames = load_classnames(cfg.classnames)  # refuses names listed twice (one class to CLIP)
    templates = load_templates(cfg.templates)
    if cfg.labels is None:
        return classnames, templates, first_of_each_name(classnames)
    missing = [label for label in cfg.labels if label not in classnames]
    if missing:
        raise ParError(f"label(s) {missing} are not classes in {cfg.classnames}")
    return classnames, templates, [classnames.index(label) for label in cfg.labels]


def check(cfg: ScanConfig):
    """Everything that can be checked without reading images or weights; returns (scanner, class names,
    templates, candidate indices, image paths)."""
    scanner = make_scanner(cfg.scanner, cfg.scanner_params)
    classnames, templates, candidates = _label_space(cfg, scanner)
    scanner.check(len(candidates) if candidates is not None else 0, cfg.top_k)
    if cfg.threshold is not None:
        scanner.check_threshold(cfg.threshold)
    paths = list_images(cfg.images, cfg.image_root)
    if min(len(paths), cfg.max_images) < scanner.min_images:
        kept = f" of which max_images keeps {cfg.max_images}" if cfg.max_images < len(paths) else ""
        raise ParError(f"scanner {scanner.name!r} needs at least {scanner.min_images} images; {cfg.images} names "
                       f"{len(paths)} distinct ones{kept}")
    if not models.has_vision_tower(cfg.model):
        raise ParError(f"a scan inverts triggers on images, but encoder {cfg.model!r} has no vision tower config")
    checkpoint = Path(cfg.checkpoint)
    if not checkpoint.is_file():
        raise ParError(f"checkpoint not found: {checkpoint}")
    saved = models.read_metadata(checkpoint).get("model")
    if saved and not models.same_encoder(saved, cfg.model):
        raise ParError(f"{checkpoint} holds a {saved} model, not {models.canonical_model_name(cfg.model)}")
    if cfg.threshold is None:
        scanner.documented_threshold(models.canonical_model_name(cfg.model))  # raises where it keeps none
    return scanner, classnames, templates, candidates, paths


def scan_precision(cfg: ScanConfig) -> str:
    """The precision a scan runs in (``auto`` resolved for its device)."""
    return inference_precision(pick_device(cfg.device)) if cfg.precision == "auto" else cfg.precision


def images_digest(paths: List[Path]) -> str:
    """The digest of the shadow images a scan uses, by their names and bytes: a CSV or folder whose images
    were replaced under the same names is another scan (and a folder's other files change nothing)."""
    return digest([(path.name, file_digest(path)) for path in paths])


def scan_request(cfg: ScanConfig, checked=None) -> dict:
    """What makes two scans the same: the settings that change the result and the digests of the inputs.
    Settings a scanner does not read (class names for a label-free one, ``top_k`` for one that ranks no
    labels) are left out. ``checked``: ``check(cfg)``'s answer, when the caller has it."""
    scanner, classnames, _, candidates, paths = checked or check(cfg)
    params = {k: v for k, v in asdict(scanner.params).items() if k not in scanner.memory_settings}
    request = {"scanner": SCANNERS.canonical(cfg.scanner), "scanner_params": params,
               "model": models.canonical_model_name(cfg.model), "checkpoint_digest": file_digest(cfg.checkpoint),
               "images_digest": images_digest(select(paths, cfg.max_images, cfg.seed)),
               "max_images": cfg.max_images, "seed": cfg.seed, "threshold": cfg.threshold,
               "documented_threshold": None if cfg.threshold is not None else
               scanner.documented_threshold(models.canonical_model_name(cfg.model))[0]}
    precision = scan_precision(cfg)
    if precision != "fp32":  # fp32 left out, so a scan made before precision was a setting is still the same scan
        request["precision"] = precision
    if scanner.uses_labels:
        spec_digest = lambda spec, builtin: spec if spec == builtin else path_digest(spec)  # noqa: E731
        request.update(classnames=spec_digest(cfg.classnames, "imagenet"),
                       templates=spec_digest(cfg.templates, "openai"), labels=cfg.labels)
        twins = left_out(classnames, candidates) if cfg.labels is None else []
        if twins:  # absent where none is, so earlier scans of lists without twins are still the same scans
            request["twins_left_out"] = twins
    if scanner.ranks_labels:
        request["top_k"] = cfg.top_k
    return request


def scan_checkpoint(cfg: ScanConfig, checked=None) -> ScanResult:
    """Scans ``cfg.checkpoint`` with ``cfg.scanner`` on the shadow images ``cfg.images`` (``checked``:
    ``check(cfg)``'s answer, when the caller has it)."""
    started = time.time()
    scanner, classnames, templates, candidates, paths = checked or check(cfg)
    context, images, kept = _context(cfg, scanner, classnames, templates, candidates, paths)
    try:
        result = scanner.scan(context)
    except torch.cuda.OutOfMemoryError:
        setting = scanner.batch_setting
        lower = (f"lower --scanner-param {setting} (now {getattr(scanner.params, setting)})" if setting
                 else "give fewer --max-images")
        raise ParError(f"the {scanner.name} scan ran out of device memory: {lower}") from None
    result.examples = images[:EXAMPLES].cpu()
    result.seconds = time.time() - started
    result.settings = {**asdict(cfg), "precision_used": context.precision, "images_used": len(kept),
                       "images_listed": len(paths)}
    twins = left_out(classnames, candidates) if scanner.uses_labels and cfg.labels is None else []
    if twins:
        result.settings["twins_left_out"] = twins  # names listed twice: one candidate
    return result


def _context(cfg: ScanConfig, scanner: Scanner, classnames, templates, candidates, paths):
    """(the scan context: the model and its shadow images decoded, its zero-shot classifier for a label
    scanner; the images; the paths kept)."""
    device = pick_device(cfg.device)
    model = models.create_model(cfg.model, initialise=False)  # its input size, before the images are decoded
    size = models.image_size(model)
    kept = select(paths, cfg.max_images, cfg.seed)
    images = decode(kept, size, cfg.progress)
    models.load_weights(model, cfg.checkpoint)
    model = model.to(device).eval().requires_grad_(False)
    mean, std = models.image_mean_std(model)
    context = ScanContext(model=model, images=images.to(device), mean=mean, std=std, device=device, seed=cfg.seed,
                          encoder=models.canonical_model_name(cfg.model),
                          progress=cfg.progress, top_k=cfg.top_k, threshold=cfg.threshold,
                          logit_scale=float(model.logit_scale.exp()), precision=scan_precision(cfg))
    if scanner.uses_labels:
        with autocast(context.precision, device):
            classifier = zero_shot_classifier(model, models.get_tokenizer(cfg.model), classnames, templates, device)
        context.classnames, context.candidates = classnames, candidates
        context.classifier = classifier.clone().float()  # out of inference mode: a constant of the inversion's graph
    return context, images, kept


def trigger_toward(cfg: ScanConfig, label: str) -> Tuple[Optional[InvertedTrigger], Optional[float]]:
    """Neural Cleanse's trigger toward ``label`` on ``cfg``'s checkpoint and shadow images: the smallest mask
    (with its pattern) found to send ``success_target`` of the images to the label (``label-inversion``'s
    refinement, its default settings; ``cfg``'s scanner is not used, but the bound on images per forward pass
    given to it, its ``batch_setting``, is kept: memory alone, the same trigger). A backdoor is the shortcut to its
    target, so once a scan has named the target this inverts the shortcut itself, where a label-free
    trigger may be any point the images collapse onto. (None, None) when no step reached the target."""
    setting = SCANNERS.get(cfg.scanner).batch_setting
    memory = {"batch_images": cfg.scanner_params[setting]} if setting and setting in cfg.scanner_params else {}
    inversion = replace(cfg, scanner="label-inversion", scanner_params=memory, labels=None)  # the user's memory bound
    scanner, classnames, templates, candidates, paths = check(inversion)
    target = target_index(classnames, label, cfg.classnames, "label")
    context, _, _ = _context(inversion, scanner, classnames, templates, candidates, paths)
    try:
        best = scanner.refine(context, target)
    except torch.cuda.OutOfMemoryError:
        raise ParError(f"inverting the trigger toward {label!r} ran out of device memory: lower the scan's "
                       f"scanner_params {setting or 'batch_images'} (images per forward pass; now "
                       f"{scanner.params.batch_images})") from None
    if best is None:
        return None, None
    size, mask, pattern, success = best
    return InvertedTrigger(mask.cpu(), pattern.cpu(), "patch", float(size), label), float(success)
