"""``patch-compactness``: per candidate label, Neural Cleanse's smallest patch trigger toward it, judged by
its shape rather than its size.

A planted patch is one small square, so the smallest trigger that sends the images to its target lies in
one small window; the smallest trigger toward a clean label is an adversarial one, spread over whichever
pixels the encoder is most sensitive to (Tabor, Guo et al. 2019, regularises inversions toward compact
triggers for the same reason). Size alone does not tell them apart on encoders that a small perturbation
sends anywhere: on the one-token micro encoder (``par-micro-vit-p32``) the smallest trigger toward the
planted label covers 3.4-4.3 % of the image and the next label's 3.8-4.6 %. Its shape does, by a margin
that depends on the world: with an 8-px patch, 68-78 % of the planted label's trigger lies in one 8 x 8
window on a development world where every clean model's largest share is at most 40 %, but 41 % and 48 %
on two others whose clean models reach 40 % and 45 %.

Per label ``t`` the trigger is ``label-inversion``'s refinement (the same settings, so the same trigger
``par.scan.trigger_toward`` draws): the smallest mask found that sends ``success_target`` of the shadow
images to ``t``. Its statistic is the share of the mask's mass in the best square window of side
``window`` times the image side (a mask spread evenly scores the window's area, 1/16 at the default 1/4;
the window is a fraction of the image so that it means the same at any resolution). The label with the
largest share is the candidate target, flagged when the share is at or above the encoder's threshold; a
label no trigger reached scores 0. Large label sets are pruned first by ``label-inversion``'s ranking
pass (the ``top_k`` labels most lifted after ``rank_steps`` steps).

It is a patch scanner: a blend or a warp has no compact trigger, and an encoder whose tokens share one
embedding (``par-micro-vit``'s 8-px tokens) finds a compact trigger toward any label in one token, on
clean models as well (shares up to 0.94 there), so it has no threshold for it. **Thresholds** are per
encoder, set on clean models only: ``par-micro-vit-p32``'s is the largest share over the 16 clean models of
two development worlds (seeds 2 and 3 of ``configs/micro-scan-p32.yaml``, each with its foundation, three
0 %-poison and four benign fine-tunes) plus 5 %, DECREE's rule mirrored. A scan of an encoder without one
needs the user's own (``threshold``), set the same way.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from par.errors import ParError
from par.scan.base import SCANNERS, InvertedTrigger, ScanContext, ScannerParams, ScanResult, Scanner
from par.scan.inversion import LabelInversion, LabelInversionParams

CLEAN_MAX = {  # the largest share over clean models of the encoder, and which models
    "par-micro-vit-p32": (0.448, "16 clean par-micro-vit-p32 models of 2 development worlds"),
}
ABOVE_CLEAN = 1.05  # decree's rule, mirrored: 5 % beyond the clean models' extreme
THRESHOLDS = {name: (round(share * ABOVE_CLEAN, 3),
                     f"the largest share over {models} ({share}) plus {round(100 * (ABOVE_CLEAN - 1))} %")
              for name, (share, models) in CLEAN_MAX.items()}


@dataclass
class PatchCompactnessParams(ScannerParams):
    window: float = 0.25  # side of the judging window, a fraction of the image side
    # label-inversion's refinement (its defaults: Neural Cleanse's adaptive price), per label
    refine_steps: int = 200
    success_target: float = 0.99
    lam: float = 5.0
    lr: float = 0.1
    mask_init: float = -3.0
    rank_steps: int = 10  # steps of the ranking pass, when there are more candidates than top_k
    batch_images: int = 640  # stamped images per forward pass (device memory alone)


def window_share(mask: torch.Tensor, side: int) -> float:
    """The share of ``mask``'s mass (``[1, H, W]`` or ``[H, W]``) in its best ``side x side`` window."""
    m = mask.reshape(1, 1, *mask.shape[-2:]).float()
    total = float(m.sum())
    if total <= 0:
        return 0.0
    return float((F.avg_pool2d(m, side, stride=1) * side * side).max()) / total


@SCANNERS.register("patch-compactness", "compactness")
class PatchCompactness(Scanner):
    """Per-label smallest patch trigger; the target is the label whose trigger is one compact patch."""

    name = "patch-compactness"
    paper_name = "per-label Neural Cleanse triggers judged by their compactness"
    Params = PatchCompactnessParams
    uses_labels = True
    ranks_labels = True
    batch_setting = "batch_images"
    memory_settings = ("batch_images",)

    def __init__(self, params: PatchCompactnessParams):
        super().__init__(params)
        shared = ("refine_steps", "success_target", "lam", "lr", "mask_init", "rank_steps", "batch_images")
        self.inversion = LabelInversion(LabelInversionParams(**{k: getattr(params, k) for k in shared}))

    def check(self, labels: int, top_k: int) -> None:
        p = self.params
        if not 0 < p.window <= 1:
            raise ParError(f"patch-compactness window must be in (0, 1] (a fraction of the image side), got "
                           f"{p.window}")
        for name in ("refine_steps", "rank_steps", "batch_images"):
            if getattr(p, name) < 1:
                raise ParError(f"patch-compactness {name} must be at least 1, got {getattr(p, name)}")
        if p.lr <= 0 or p.lam < 0 or not 0 < p.success_target <= 1:
            raise ParError(f"patch-compactness needs lr > 0, lam >= 0 and success_target in (0, 1]; got lr={p.lr}, "
                           f"lam={p.lam}, success_target={p.success_target}")
        if labels < 2:
            raise ParError(f"patch-compactness needs at least 2 candidate labels, got {labels}")

    def documented_threshold(self, encoder: Optional[str]):
        if encoder not in THRESHOLDS:
            measured = ", ".join(THRESHOLDS) or "none"
            raise ParError(f"patch-compactness has no threshold for {encoder} (measured for: {measured}); give one "
                           f"set on clean models of it (--threshold: the largest share over them plus a margin)")
        return THRESHOLDS[encoder]

    def scan(self, ctx: ScanContext) -> ScanResult:
        from tqdm import tqdm

        p = self.params
        side = max(1, round(p.window * min(ctx.images.shape[-2:])))
        candidates, details = list(ctx.candidates), {"pruned": False}
        if len(candidates) > ctx.top_k:
            clean_logp = ctx.predict(ctx.images, p.batch_images).log_softmax(1).mean(0)
            candidates, details = self.inversion.top_k(ctx, clean_logp)
        details["window"] = side
        rows, found = [], {}
        started = time.time()
        for t in tqdm(candidates, desc="invert labels", unit="label", leave=False, disable=not ctx.progress):
            began = time.time()
            best = self.inversion.refine(ctx, t)
            name = ctx.classnames[t]
            row = {"label": name, "family": "patch", "size": None, "success": None, "share": 0.0}
            if best is not None:
                size, mask, pattern, success = best
                found[name] = InvertedTrigger(mask.cpu(), pattern.cpu(), "patch", size, name)
                row.update(size=size, success=success, share=window_share(mask, side))
            rows.append({**row, "seconds": time.time() - began})
        seconds_per_label = (time.time() - started) / len(candidates)
        if ctx.threshold is not None:
            threshold, source = float(ctx.threshold), "given by the user"
        else:
            threshold, source = self.documented_threshold(ctx.encoder)
        top = max(rows, key=lambda r: r["share"])
        flagged = top["share"] >= threshold
        triggers = {"patch": found[top["label"]]} if top["label"] in found else {}
        return ScanResult(
            scanner=self.name, flagged=flagged, value=top["share"], threshold=threshold, direction="above",
            statistic=f"largest share of a label's smallest patch trigger in one {side} x {side} window",
            threshold_source=source, target=top["label"] if flagged else None, family="patch", labels=rows,
            triggers=triggers, details={**details, "top_label": top["label"], "inverted": len(candidates),
                                        "refine_steps": p.refine_steps},
            seconds_per_label=seconds_per_label)
