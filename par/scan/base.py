"""What every checkpoint scanner is made of: the registry it is found in, what it is given, what it returns.

A **scanner** looks at one CLIP checkpoint and a few clean, unlabelled images (the defender's
"shadow" images) and says whether the checkpoint carries a backdoor. It is one class and one
registration (here, or in a plugin: ``par.plugins``)::

    from par.scan import SCANNERS, Scanner, ScanResult

    @SCANNERS.register("my-scan")
    class MyScan(Scanner):
        def scan(self, ctx):
            ...
            return ScanResult(scanner=self.name, flagged=..., statistic="...", value=..., threshold=...,
                              threshold_source="...")

``ctx`` (``ScanContext``) holds the model (frozen, eval mode), the decoded images as ``[0, 1]``
floats, the normalisation, and, for scanners that reason in labels (``uses_labels``), the
zero-shot classifier built from the class names and templates. Settings of a scanner are its
``Params`` dataclass, filled from ``scanner_params`` (``--scanner-param KEY=VALUE``).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from par.augment import normalize
from par.config import build
from par.errors import ParError
from par.registry import Registry
from par.utils import autocast

SCANNERS: Registry = Registry("scanner", builtins="par.scan")

MAD_SCALE = 1.4826  # a normal distribution's standard deviation per median absolute deviation


@dataclass
class ScannerParams:
    """A scanner's own settings (none here); subclasses add theirs."""


@dataclass
class InvertedTrigger:
    """A trigger found by a scanner: ``x' = (1 - mask) x + mask * pattern`` on ``[0, 1]`` images.

    ``mask`` is ``[1, H, W]`` in [0, 1] (a blended trigger is a constant mask, its weight), ``pattern``
    ``[3, H, W]`` in [0, 1]; ``size`` is what the scanner measured it by.
    """

    mask: torch.Tensor
    pattern: torch.Tensor
    family: str
    size: float
    label: Optional[str] = None

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        mask, pattern = self.mask.to(images), self.pattern.to(images)
        return (1 - mask) * images + mask * pattern

    @property
    def place(self) -> Optional[dict]:
        return mask_place(self.mask)


def mask_place(mask: torch.Tensor) -> Optional[dict]:
    """Where a mask (``[..., H, W]``, non-negative) lies: the centre of its mass as ``[row, column]`` and the
    ``box`` ``[top, left, bottom, right]`` (inclusive) of its pixels at half its largest value or more, in
    pixels of the image; None for an empty mask. A blended trigger's constant mask spans the whole image."""
    mask = mask.detach().float().cpu().reshape(mask.shape[-2:])
    total = float(mask.sum())
    if total <= 0:
        return None
    rows, columns = torch.meshgrid(torch.arange(mask.shape[0]), torch.arange(mask.shape[1]), indexing="ij")
    strong = (mask >= 0.5 * mask.max()).nonzero()
    (top, left), (bottom, right) = strong.min(0).values.tolist(), strong.max(0).values.tolist()
    return {"centre": [round(float((mask * rows).sum()) / total, 1), round(float((mask * columns).sum()) / total, 1)],
            "box": [top, left, bottom, right]}


@dataclass
class ScanResult:
    """A scanner's answer. ``flagged`` compares ``value`` (named by ``statistic``) with ``threshold``
    (``direction``: flagged when the value is ``above`` or ``below`` it); ``threshold_source`` says where
    the threshold comes from. ``labels`` holds one row per label (and trigger family) a label scanner
    inverted; ``triggers`` the trigger found per family for ``target`` (or for the top label when
    nothing is flagged, to look at)."""

    scanner: str
    flagged: bool
    statistic: str
    value: float
    threshold: float
    threshold_source: str
    direction: str = "above"
    target: Optional[str] = None
    family: Optional[str] = None
    labels: List[dict] = field(default_factory=list)
    triggers: Dict[str, InvertedTrigger] = field(default_factory=dict)
    details: Dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    seconds_per_label: Optional[float] = None
    examples: Optional[torch.Tensor] = None  # a few of the clean images, to show the trigger on
    settings: Dict[str, Any] = field(default_factory=dict)

    @property
    def verdict(self) -> str:
        return "backdoored" if self.flagged else "clean"

    @property
    def trigger(self) -> Optional[InvertedTrigger]:
        """The trigger of the winning family (the one the verdict rests on)."""
        if self.family in self.triggers:
            return self.triggers[self.family]
        return next(iter(self.triggers.values()), None)


NO_GRAD_PART = 512  # images per forward pass without gradients, unless a scanner bounds it by its own setting


@dataclass
class ScanContext:
    """What a scanner is given. ``images`` are the shadow images, ``[N, 3, H, W]`` floats in [0, 1] on
    ``device``, in a fixed order (sorted by path), so a scan does not depend on how they were listed.
    ``classifier`` (``[D, C]``), ``classnames`` and ``candidates`` (indices of the labels to consider) are
    set for scanners with ``uses_labels``; ``logit_scale`` is the model's own temperature."""

    model: torch.nn.Module
    images: torch.Tensor
    mean: Sequence[float]
    std: Sequence[float]
    device: torch.device
    seed: int = 0
    progress: bool = True
    classnames: Optional[List[str]] = None
    classifier: Optional[torch.Tensor] = None
    candidates: Optional[List[int]] = None
    top_k: int = 10
    logit_scale: float = 100.0
    threshold: Optional[float] = None  # the user's threshold, replacing the scanner's documented one
    encoder: Optional[str] = None  # the encoder's canonical name: a scanner may keep thresholds per encoder
    precision: str = "fp32"  # the image tower's autocast (par.utils.PRECISIONS); embeddings come out in fp32

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised image embeddings of ``[0, 1]`` images, differentiable with respect to the images."""
        with autocast(self.precision, self.device):
            features = self.model.encode_image(normalize(images, self.mean, self.std))
        return torch.nn.functional.normalize(features.float(), dim=-1)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Zero-shot logits at the model's temperature (what its training calibrated)."""
        return self.logit_scale * self.embed(images) @ self.classifier

    def predict(self, images: torch.Tensor, part: int = NO_GRAD_PART) -> torch.Tensor:
        """``logits`` without gradients, at most ``part`` images per forward pass (one pass when they fit)."""
        with torch.no_grad():
            if images.shape[0] <= part:
                return self.logits(images)
            return torch.cat([self.logits(images[i:i + part]) for i in range(0, images.shape[0], part)])


class Scanner:
    """Base: ``scan(ctx)`` returns a ``ScanResult``; ``check`` refuses settings it cannot run with."""

    name = "scanner"
    paper_name = ""
    Params = ScannerParams
    uses_labels = False  # needs class names and templates (the zero-shot classifier)
    ranks_labels = False  # ranks the candidates in a cheap pass and inverts only the top_k of them
    min_images = 8  # fewer shadow images than this are refused before any work
    batch_setting: Optional[str] = None  # the Params field bounding the images per forward pass (device memory)
    # Params fields that bound memory alone (any value gives the same scan): not part of a scan's request,
    # so a finished scan is reused whatever the value it was made with
    memory_settings: Tuple[str, ...] = ()

    def __init__(self, params: ScannerParams):
        self.params = params

    def check(self, labels: int, top_k: int) -> None:
        """Raises on settings this scanner cannot run with; ``labels`` is the number of candidate labels
        (0 for a label-free scanner), ``top_k`` how many of them a ranking pass may keep."""

    def documented_threshold(self, encoder: Optional[str]) -> Tuple[Any, Optional[str]]:
        """(the threshold this scanner flags by on ``encoder`` when the user gives none, where it comes from).
        It is part of a scan's request, so a finished scan is not reused once its threshold has changed;
        ``None`` for a scanner that keeps none apart from its ``scan``."""
        return None, None

    def check_threshold(self, threshold: float) -> None:
        """Raises when one user threshold cannot mean what the user wants with these settings (called before any
        work, only when the user gives one)."""

    def threshold(self, ctx: ScanContext, default: float) -> float:
        return default if ctx.threshold is None else float(ctx.threshold)

    def scan(self, ctx: ScanContext) -> ScanResult:
        raise NotImplementedError


def make_scanner(name: str, values: Optional[dict] = None) -> Scanner:
    """The scanner registered as ``name`` with its ``Params`` filled from ``values``; a NaN or infinite
    setting is refused here, for every scanner, before its own ``check``."""
    cls, what = SCANNERS.get(name), f"scanner_params of {SCANNERS.canonical(name)!r}"
    params = build(cls.Params, dict(values or {}), what)
    bad = {k: v for k, v in asdict(params).items() if isinstance(v, float) and not math.isfinite(v)}
    if bad:
        raise ParError(f"{what} must be finite numbers, got {bad}")
    return cls(params)


def robust_z(values: Sequence[float], reference: Optional[Sequence[float]] = None) -> List[float]:
    """``(v - median) / (1.4826 * MAD)`` per value, median and MAD of ``reference`` (default: ``values``):
    how many robust standard deviations a value lies above the reference's bulk.

    The median (of an even count: the mean of the middle two) and the MAD are order-free. The MAD is
    floored at a millionth of the values' scale, so identical values give z = 0 and a single different
    one a large, finite z."""
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64)
    ref = tensor if reference is None else torch.tensor([float(v) for v in reference], dtype=torch.float64)
    median = ref.quantile(0.5)
    scale = MAD_SCALE * (ref - median).abs().quantile(0.5)
    floor = 1e-6 * max(1.0, float(ref.abs().max()))
    return ((tensor - median) / max(float(scale), floor)).tolist()


def check_finite(loss: torch.Tensor, what: str, step: int) -> None:
    """A NaN or inf loss is an error naming what was being optimised, never a silent garbage trigger."""
    if not bool(torch.isfinite(loss)):
        raise ParError(f"non-finite loss ({float(loss.detach())}) while {what}, at step {step}: the model's outputs "
                       "overflow (its logit scale or weights are extreme); the scan cannot proceed")


def finite_number(value: float) -> Optional[float]:
    """A float for JSON: None for NaN or inf (JSON has neither)."""
    return float(value) if math.isfinite(value) else None
