"""``label-inversion``: per candidate label, invert a trigger toward it under the zero-shot classifier, and
flag the label whose trigger behaves like a planted one.

For each candidate label ``t`` a trigger is optimised on the shadow images (Neural Cleanse's recipe,
sigmoid parameters, Adam): cross-entropy toward ``t`` plus ``lam`` times the trigger's size, in two
families,

* ``patch``: a mask ``m`` (``1 x H x W``, initialised around sigmoid(-3)) and a pattern ``p``,
  ``x' = (1 - m) x + m p``; size = mean of the mask (patch triggers);
* ``blend``: a full-image pattern blended with a learnt weight, ``x' = (1 - a) x + a p``; size = ``a``
  (global triggers, which a mask's size alone misses).

Neural Cleanse flags the label with an anomalously *small* trigger, which assumes every label is about
as far from the images as any other. Under a zero-shot classifier that does not hold, and on the micro
world it fails outright: on the poisoned micro models built (an 8-px BadNet-Stripes patch toward
``banana``) every label's trigger is about as small (mean masks 0.03-0.06, also with Neural Cleanse's adaptive
price), a natural "hub" label's (``boat``, ``car``) the smallest. Two other things mark the planted
label, each measured at the common price ``lam`` per unit of size:

* **lift**: how far its own trigger moves the images toward it, ``mean log p_t(x') - mean log p_t(x)``
  over the clean images (the planted label sits far from every clean image, yet a trigger of ordinary
  size sends them all there);
* **pull**: the mean lift of ``t`` under the triggers inverted for the *other* labels. A trigger aimed
  elsewhere pushes the images away from most labels, but the planted label gains from it (the
  backdoor's shortcut is the easiest way for any perturbation to move the embedding), as InverTune
  observed with untargeted perturbations; a natural hub is reached by its own trigger only. On the
  poisoned micro model ``banana`` is the only label whose log-probability rises under the other
  labels' triggers.

Each is turned into a robust z over the labels (``(v - median) / (1.4826 * MAD)``) per family, and the
statistic is their sum, ``z = z_lift + z_pull``; the label and family with the largest margin over
their family's threshold decide the verdict, the target and the family.

Large label sets are pruned first: every candidate gets ``rank_steps`` steps of the patch inversion
(a trigger toward the planted label lifts it from the first steps), and only the ``top_k`` with the
largest lift after them are inverted fully, with ``reference_labels`` drawn at random from all
candidates, against whose values every z is measured (all labels, and all as reference, when there
are no more than ``top_k + reference_labels``).

Defaults were chosen on the micro world's clean models (CALIBRATION below): ``lam`` 5 at lr 0.1
(Adam), as the first trial of this scanner on the tiny 64-px CLIP used; 30 steps separate as well
as 60 (the lift is settled early) at half the cost; 128 images rather than 64, because with 64 the
top z of the same clean model varied with the draw of images by a factor of three and with 128 far
less. The blend family's z is dominated on the micro models by a natural hub (``car``: up to 10.0 on
a clean model), so its threshold leaves it silent there; the patch family carries the verdict.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Dict, List

import torch
import torch.nn.functional as F

from par.attacks.base import row_seed
from par.errors import ParError
from par.scan.base import (SCANNERS, InvertedTrigger, ScanContext, ScannerParams, ScanResult, Scanner, check_finite,
                           robust_z)

FAMILIES = ("patch", "blend")
MIN_LABELS = 5  # a robust z needs a few labels to tell the anomalous one from the rest

# The flagging thresholds, per family (their z's spread differently on clean models): the largest z of
# each family over the micro world's clean models (configs/micro-backdoor.yaml's foundation, two
# foundations trained with other seeds, and the foundation fine-tuned on clean pairs for as long as
# the poisoning fine-tune), each in 10 draws of 128 images (6 of the training pairs' images, 3 of the
# clean pairs', the test split), plus a margin. The poisoned micro model's target scored 4.4-6.9 in
# the patch family in the same draws (not used to set them). These are the micro world's: a clean
# model of an earlier, longer-trained micro world reached 7.0 in one draw (its hub ``boat``).
CALIBRATION = "4 clean micro models x 10 draws of 128 images"
Z_CLEAN_MAX = {"patch": 3.3, "blend": 10.0}
MARGIN = 0.5
Z_THRESHOLDS = {family: round(z + MARGIN, 1) for family, z in Z_CLEAN_MAX.items()}
THRESHOLD_SOURCES = {family: f"the largest {family} z over {CALIBRATION} ({Z_CLEAN_MAX[family]}) plus a margin of "
                             f"{MARGIN}" for family in Z_CLEAN_MAX}


@dataclass
class LabelInversionParams(ScannerParams):
    steps: int = 30  # optimisation steps per label and family
    rank_steps: int = 10  # steps of the ranking pass, when there are more candidates than top_k
    lam: float = 5.0  # price per unit of trigger size (mean mask, or blend weight)
    lr: float = 0.1  # Adam's learning rate on the sigmoid parameters
    mask_init: float = -3.0  # initial mask / blend weight, before the sigmoid (sigmoid(-3) = 0.047)
    families: List[str] = field(default_factory=lambda: list(FAMILIES))
    # labels are inverted together (independent parameters: the same result as one by one, faster), at
    # most this many stamped images (labels x shadow images) per forward pass; lower it for large encoders
    # (a ViT-L/14@336px keeps ~0.6 GB per image for the gradient in bf16): below the shadow image count, a
    # label's images go through in parts whose gradients add up to the whole's
    batch_images: int = 640
    # with more candidates than top_k + reference_labels, the z of every inverted label is measured against
    # this many labels drawn at random from all candidates (inverted too): the top_k alone, the labels
    # most easily lifted, would be a biased reference (on the micro world, z over the 10 most liftable of
    # its 12 labels lifted the clean foundation's top z from at most 3.1 to 6.1)
    reference_labels: int = 10
    # a flagged label's patch trigger is then refined with Neural Cleanse's schedule (lam x1.5 after 5 steps
    # in a row that send at least success_target of the images to the label, /1.5 after 5 that do not; the
    # smallest such mask kept), to show the backdoor's trigger; it does not change the verdict. 0: off
    refine_steps: int = 200
    success_target: float = 0.99
    # flagging thresholds of your own, per family (their z spread differently on clean models), replacing the
    # documented ones (Z_THRESHOLDS) for the families named; a single --threshold is for one family alone
    thresholds: Dict[str, float] = field(default_factory=dict)


def _start(family: str, labels: List[int], shape, seed: int, init: float, device):
    """Initial (mask, pattern) parameters for ``labels``: the pattern of label ``t`` is drawn from its own
    seed, so a label's trigger does not depend on which other labels are inverted with it."""
    n = len(labels)
    _, h, w = shape
    mask_shape = (n, 1, h, w) if family == "patch" else (n, 1, 1, 1)
    mask = torch.full(mask_shape, float(init), device=device)
    pattern = torch.stack([0.1 * torch.randn(3, h, w, generator=torch.Generator().manual_seed(row_seed(seed, t)))
                           for t in labels]).to(device)
    return mask.requires_grad_(), pattern.requires_grad_()


def _stamp(x, raw_mask, raw_pattern):
    """``x`` under one trigger given by its sigmoid parameters: ``(1 - m) x + m p``."""
    mask, pattern = torch.sigmoid(raw_mask), torch.sigmoid(raw_pattern)
    return (1 - mask) * x + mask * pattern


@SCANNERS.register("label-inversion", "label_inversion", "inversion")
class LabelInversion(Scanner):
    """Zero-shot per-label trigger inversion; the target is the label whose trigger lifts it anomalously."""

    name = "label-inversion"
    paper_name = "per-label trigger inversion (Neural Cleanse, zero-shot)"
    Params = LabelInversionParams
    uses_labels = True
    ranks_labels = True
    batch_setting = "batch_images"
    memory_settings = ("batch_images",)  # parts add up to the whole batch's gradient

    def check(self, labels: int, top_k: int) -> None:
        p = self.params
        unknown = [f for f in p.families if f not in FAMILIES]
        if unknown or not p.families or len(set(p.families)) != len(p.families):
            raise ParError(f"label-inversion families must be distinct, among {list(FAMILIES)}; got {p.families}")
        if not 0 < p.success_target <= 1:
            raise ParError(f"label-inversion success_target must be in (0, 1], got {p.success_target}")
        for name, low in (("steps", 1), ("rank_steps", 1), ("batch_images", 1), ("refine_steps", 0)):
            if getattr(p, name) < low:
                raise ParError(f"label-inversion {name} must be at least {low}, got {getattr(p, name)}")
        if p.lr <= 0 or p.lam < 0:
            raise ParError(f"label-inversion needs lr > 0 and lam >= 0, got lr={p.lr}, lam={p.lam}")
        if labels < MIN_LABELS:
            raise ParError(f"label-inversion compares each label's trigger with the others' and needs at least "
                           f"{MIN_LABELS} candidate labels; got {labels}")
        unknown = sorted(set(p.thresholds) - set(p.families))
        if unknown:
            raise ParError(f"label-inversion thresholds name families {unknown} not scanned (families: {p.families})")
        if not all(math.isfinite(v) for v in p.thresholds.values()):
            raise ParError(f"label-inversion thresholds must be finite numbers, got {p.thresholds}")
        if p.reference_labels < MIN_LABELS:
            raise ParError(f"label-inversion needs reference_labels of at least {MIN_LABELS}, got "
                           f"{p.reference_labels}")

    def _optimise(self, ctx: ScanContext, family: str, labels: List[int], steps: int, what: str):
        """``steps`` of the inversion for ``labels`` at once (independent parameters, so the same as one
        by one); returns (mask [L,1,H,W], pattern [L,3,H,W], mean log-probability of every class under
        each label's trigger [L, C])."""
        p, x = self.params, ctx.images
        n = x.shape[0]
        raw_mask, raw_pattern = _start(family, labels, x.shape[1:], ctx.seed, p.mask_init, ctx.device)
        optimiser = torch.optim.Adam([raw_mask, raw_pattern], lr=p.lr)
        target = torch.tensor(labels, device=ctx.device).repeat_interleave(n)
        whole = len(labels) * n <= p.batch_images  # else each label's images in parts

        def stamped_logits():
            mask, pattern = torch.sigmoid(raw_mask)[:, None], torch.sigmoid(raw_pattern)[:, None]
            return ctx.logits(((1 - mask) * x[None] + mask * pattern).flatten(0, 1)), mask

        for step in range(steps):
            optimiser.zero_grad(set_to_none=True)
            if whole:
                logits, mask = stamped_logits()
                ce = F.cross_entropy(logits, target, reduction="none").view(len(labels), n).mean(1)
                loss = (ce + p.lam * mask.flatten(1).mean(1)).sum()
                check_finite(loss, what, step)
                loss.backward()
            else:
                ce = sum(self._cross_entropy_backward(ctx, raw_mask[i], raw_pattern[i], t)[0]
                         for i, t in enumerate(labels))
                size = p.lam * torch.sigmoid(raw_mask).flatten(1).mean(1).sum()
                check_finite(ce + size.detach(), what, step)
                size.backward()
            optimiser.step()
        with torch.no_grad():
            if whole:
                logp = stamped_logits()[0].log_softmax(1).view(len(labels), n, -1).mean(1)
            else:
                logp = torch.stack([sum(ctx.logits(_stamp(x[rows], raw_mask[i], raw_pattern[i])).log_softmax(1).sum(0)
                                        for rows in self._parts(n)) / n for i in range(len(labels))])
            check_finite(logp.sum(), what, steps)
        h, w = x.shape[-2:]
        return (torch.sigmoid(raw_mask).detach().expand(len(labels), 1, h, w),
                torch.sigmoid(raw_pattern).detach(), logp)

    def _parts(self, n: int) -> List[slice]:
        """The shadow images in parts of at most ``batch_images``."""
        size = self.params.batch_images
        return [slice(i, i + size) for i in range(0, n, size)]

    def _cross_entropy_backward(self, ctx: ScanContext, raw_mask, raw_pattern, label: int):
        """For one label's trigger: the mean cross-entropy toward ``label`` over the shadow images, its gradient
        accumulated part by part (the same gradient as the whole batch's), and the share sent to ``label``."""
        x, n = ctx.images, ctx.images.shape[0]
        total, hits = 0.0, 0
        for rows in self._parts(n):
            logits = ctx.logits(_stamp(x[rows], raw_mask, raw_pattern))
            ce = F.cross_entropy(logits, torch.full((logits.shape[0],), label, device=ctx.device), reduction="sum") / n
            ce.backward()
            total, hits = total + ce.detach(), hits + int((logits.argmax(1) == label).sum())
        return total, hits / n

    def refine(self, ctx: ScanContext, label: int):
        """The smallest patch trigger found that sends ``success_target`` of the images to ``label`` (Neural
        Cleanse's adaptive price); None when no step reached the target."""
        p, x = self.params, ctx.images
        raw_mask, raw_pattern = _start("patch", [label], x.shape[1:], ctx.seed, p.mask_init, ctx.device)
        optimiser = torch.optim.Adam([raw_mask, raw_pattern], lr=p.lr)
        target = torch.full((x.shape[0],), label, device=ctx.device)
        lam, met, missed, best = p.lam, 0, 0, None
        for step in range(p.refine_steps):
            optimiser.zero_grad(set_to_none=True)
            mask, pattern = torch.sigmoid(raw_mask[0]), torch.sigmoid(raw_pattern[0])
            if x.shape[0] <= p.batch_images:
                logits = ctx.logits((1 - mask) * x + mask * pattern)
                success = float((logits.argmax(1) == target).float().mean())
                ce = F.cross_entropy(logits, target)
            else:  # in parts: the cross-entropy's gradient is taken here, the size's below
                ce, success = self._cross_entropy_backward(ctx, raw_mask[0], raw_pattern[0], label)
            size = float(mask.detach().mean())
            if success >= p.success_target and (best is None or size < best[0]):
                best = (size, mask.detach().clone(), pattern.detach().clone(), success)
            met, missed = (met + 1, 0) if success >= p.success_target else (0, missed + 1)
            if met >= 5:
                lam, met = lam * 1.5, 0
            elif missed >= 5:
                lam, missed = lam / 1.5, 0
            loss = ce + lam * mask.mean()
            check_finite(loss, f"refining the patch trigger of label {ctx.classnames[label]!r}", step)
            (loss if ce.requires_grad else lam * mask.mean()).backward()
            optimiser.step()
        return best

    def _success(self, ctx: ScanContext, label: int, mask, pattern) -> float:
        stamped = (1 - mask) * ctx.images + mask * pattern
        return float((ctx.predict(stamped, self.params.batch_images).argmax(1) == label).float().mean())

    def _chunks(self, ctx: ScanContext, labels: List[int]) -> List[List[int]]:
        """``labels`` in groups inverted together: at most ``batch_images`` stamped images per forward pass."""
        per_batch = max(1, self.params.batch_images // ctx.images.shape[0])
        return [labels[i:i + per_batch] for i in range(0, len(labels), per_batch)]

    def rank(self, ctx: ScanContext, clean_logp: torch.Tensor) -> List[dict]:
        """The ranking pass: ``rank_steps`` of the patch inversion per candidate, in batches of labels;
        candidates sorted by lift, largest first."""
        from tqdm import tqdm

        ranking = []
        with tqdm(total=len(ctx.candidates), desc="rank labels", unit="label", leave=False,
                  disable=not ctx.progress) as bar:
            for chunk in self._chunks(ctx, ctx.candidates):
                _, _, logp = self._optimise(ctx, "patch", chunk, self.params.rank_steps, "ranking candidate labels")
                ranking += [{"label": ctx.classnames[t], "index": t, "lift": float(logp[i, t] - clean_logp[t])}
                            for i, t in enumerate(chunk)]
                bar.update(len(chunk))
        return sorted(ranking, key=lambda r: (-r["lift"], r["index"]))

    def top_k(self, ctx: ScanContext, clean_logp: torch.Tensor):
        """The ranking pass's ``top_k`` candidates, and what a scan records of it (the ranking, its cost)."""
        started = time.time()
        ranking = self.rank(ctx, clean_logp)
        top = [r["index"] for r in ranking[:ctx.top_k]]
        return top, {"pruned": True, "ranking": [{k: r[k] for k in ("label", "lift")} for r in ranking],
                     "rank_seconds_per_label": round((time.time() - started) / len(ranking), 4),
                     "top_k": [ctx.classnames[t] for t in top]}

    def check_threshold(self, threshold: float) -> None:
        families = self.params.families
        if len(families) > 1:
            documented = ", ".join(f"{f} {Z_THRESHOLDS[f]}" for f in families)
            raise ParError(f"label-inversion judges each trigger family's z by a threshold of its own (documented: "
                           f"{documented}; their z spread differently on clean models), so one threshold cannot "
                           f"serve {families}: give them per family, --scanner-param 'thresholds={{patch: 5.0, "
                           f"blend: 11.0}}', or one family with --scanner-param 'families=[patch]'")
        if families[0] in self.params.thresholds:
            raise ParError(f"label-inversion was given a threshold twice for the {families[0]} family (threshold "
                           f"and scanner_params thresholds); give one")

    def documented_threshold(self, encoder):
        """Per trigger family (the same for every encoder: set on the micro world's clean models)."""
        families = self.params.families
        return {f: Z_THRESHOLDS[f] for f in families}, {f: THRESHOLD_SOURCES[f] for f in families}

    def scan(self, ctx: ScanContext) -> ScanResult:
        from tqdm import tqdm

        p = self.params
        clean_logp = ctx.predict(ctx.images, p.batch_images).log_softmax(1).mean(0)
        candidates, reference = list(ctx.candidates), list(ctx.candidates)
        details = {"pruned": False}
        if len(candidates) > ctx.top_k + p.reference_labels:
            top, details = self.top_k(ctx, clean_logp)
            order = torch.randperm(len(candidates), generator=torch.Generator().manual_seed(ctx.seed))
            reference = sorted(candidates[i] for i in order[:p.reference_labels].tolist())
            candidates = top + [t for t in reference if t not in top]
            details["reference"] = [ctx.classnames[t] for t in reference]
        rows, found, lifts = [], {}, {}
        started = time.time()
        chunks = self._chunks(ctx, candidates)
        with tqdm(total=len(candidates) * len(p.families), desc="invert labels", unit="label", leave=False,
                  disable=not ctx.progress) as bar:
            for family in p.families:
                for chunk in chunks:
                    began = time.time()
                    what = f"inverting {family} triggers for label(s) {[ctx.classnames[t] for t in chunk]}"
                    masks, patterns, logp = self._optimise(ctx, family, chunk, p.steps, what)
                    seconds = (time.time() - began) / len(chunk)
                    for i, (t, mask, pattern) in enumerate(zip(chunk, masks, patterns)):
                        name, size = ctx.classnames[t], float(mask.mean())
                        found[(t, family)] = InvertedTrigger(mask.cpu(), pattern.cpu(), family, size, name)
                        lifts[(t, family)] = (logp[i] - clean_logp).cpu()  # every class's lift under t's trigger
                        rows.append({"label": name, "index": t, "family": family, "size": size,
                                     "success": self._success(ctx, t, mask, pattern), "seconds": seconds,
                                     "reference": t in reference})
                    bar.update(len(chunk))
        seconds_per_label = (time.time() - started) / len(candidates)
        for family in p.families:
            group = [r for r in rows if r["family"] == family]
            for row in group:
                t = row["index"]
                row["lift"] = float(lifts[(t, family)][t])
                row["pull"] = sum(float(lifts[(s, family)][t]) for s in candidates if s != t) / (len(candidates) - 1)
            is_reference = [r["reference"] for r in group]
            for key in ("lift", "pull"):
                values = [r[key] for r in group]
                zs = robust_z(values, [v for v, ref in zip(values, is_reference) if ref])
                for row, z in zip(group, zs):
                    row[f"z_{key}"] = z
            for row in group:
                row["z"] = row["z_lift"] + row["z_pull"]
        documented, sources = self.documented_threshold(ctx.encoder)
        thresholds = {family: float(p.thresholds[family]) if family in p.thresholds else
                      self.threshold(ctx, documented[family]) for family in p.families}
        top = max(rows, key=lambda r: (r["z"] - thresholds[r["family"]], r["z"]))  # the largest margin decides
        threshold = thresholds[top["family"]]
        flagged = top["z"] >= threshold
        index = top["index"]
        for row in rows:
            del row["index"]
        triggers = {family: found[(index, family)] for family in p.families}
        if flagged and "patch" in p.families and p.refine_steps:
            refined = self.refine(ctx, index)
            if refined is not None:
                size, mask, pattern, success = refined
                triggers["patch"] = InvertedTrigger(mask.cpu(), pattern.cpu(), "patch", size, top["label"])
                details["refined"] = {"label": top["label"], "size": size, "success": success,
                                      "steps": p.refine_steps}
        details["thresholds"] = thresholds
        return ScanResult(
            scanner=self.name, flagged=flagged, statistic="largest lift + pull z over labels", value=top["z"],
            threshold=threshold, direction="above",
            threshold_source="given by the user" if ctx.threshold is not None or top["family"] in p.thresholds
            else sources[top["family"]],
            target=top["label"] if flagged else None, family=top["family"], labels=rows,
            triggers=triggers,
            details={**details, "top_label": top["label"], "inverted": len(candidates)},
            seconds_per_label=seconds_per_label)
