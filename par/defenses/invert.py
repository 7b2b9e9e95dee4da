"""``invert`` and ``par+invert``: scan the poisoned checkpoint for its trigger, then unlearn that trigger.

Two stages. **scan**: the checkpoint scanner (``par.scan``; ``label-inversion`` by default) on the images of
the job's clean pairs inverts a trigger and says whether the model responds to it like a backdoor.
**finetune**: the base objective (the CLIP loss for ``invert``, PAR's loss for ``par+invert``) plus an
unlearning term on the clean images stamped with that trigger,

    weight * mean_i || e(stamp(x_i)) - e0(x_i) ||^2        (L2-normalised image embeddings)

where ``e`` is the model being cleaned and ``e0`` the frozen poisoned model on the *same image unstamped*.
That target, rather than the image's caption: a clean image does not carry the backdoor, so ``e0(x)`` is
where the image belongs for this model apart from the backdoor; it is one target per image with no text
forward, and it asks the stamped image to land exactly where the clean one does, where a caption target
would only ask for the right caption among the batch's (the CLIP loss already asks that of clean images).

A backdoor can move under fine-tuning, so the trigger can be **re-inverted** against the model being
cleaned every ``reinvert_every`` steps: ``reinvert_steps`` Adam steps of ascent on the same term with
respect to the trigger (starting from the current one), less the scan's price on its size, so the term
follows what the model still responds to. With ``trigger_from: target`` the trigger unlearnt is not the
scanner's but Neural Cleanse's toward the label the scan named (``par.scan.trigger_toward``): the backdoor's
shortcut to its target, where a label-free trigger may be any point the images collapse onto. If the scan finds nothing, the defense says so in its report
(``defense-report.json``) and fine-tunes with the base objective alone. A trigger file can also be handed
in (``invert: {trigger: FILE}``, a ``.safetensors`` of ``mask`` [1, H, W] and ``pattern`` [3, H, W] in
[0, 1], as ``python -m par scan`` writes): the scan is then skipped.
"""
from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from par import models
from par.augment import normalize
from par.config import build
from par.data import to_float
from par.defenses.base import (OBJECTIVES, CleaningJob, MultiStageDefense, Objective, ObjectiveParams,
                               for_objective)
from par.defenses.finetune import FineTune, defense
from par.scan.files import TRIGGER_FILE, load_trigger
from par.defenses.par import PARObjective, PARParams, par_distance
from par.errors import ParError
from par.utils import atomic_write_text, digest, file_lock, unscaled_precision


def _check_unlearning(owner: str, weight, every, steps, lr, price) -> None:
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(weight) or weight < 0:
        raise ParError(f"{owner}: weight must be a finite number >= 0, got {weight!r}")
    if every is not None and (isinstance(every, bool) or not isinstance(every, numbers.Integral) or every < 1):
        raise ParError(f"{owner}: reinvert_every must be a whole number of steps >= 1 (or unset: invert once), "
                       f"got {every!r}")
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ParError(f"{owner}: reinvert_steps must be a whole number >= 1, got {steps!r}")
    for name, value in (("reinvert_lr", lr), ("size_price", price)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
            raise ParError(f"{owner}: {name} must be a finite number >= 0, got {value!r}")


@dataclass
class UnlearningParams:
    """The unlearning term's settings, shared by both objectives."""

    trigger: Optional[str] = None  # .safetensors file of mask [1, H, W] and pattern [3, H, W] in [0, 1]
    weight: float = 1.0  # of the unlearning term
    reinvert_every: Optional[int] = None  # steps between re-inversions against the model being cleaned; None: once
    reinvert_steps: int = 5
    reinvert_lr: float = 0.05  # Adam's, on the trigger's sigmoid parameters
    size_price: float = 5.0  # per unit of trigger size (mean mask), as the scan prices it

    def check_unlearning(self, owner: str) -> None:
        if not self.trigger:
            raise ParError(f"{owner}: objective_params.trigger must name a trigger file (.safetensors)")
        _check_unlearning(owner, self.weight, self.reinvert_every, self.reinvert_steps, self.reinvert_lr,
                          self.size_price)


def _logit(x: torch.Tensor) -> torch.Tensor:
    return torch.logit(x.clamp(1e-4, 1 - 1e-4))


class Unlearning:
    """The unlearning term and the trigger it stamps (sigmoid parameters, so re-inversion stays in [0, 1]);
    mixed in before an Objective, whose hooks it extends."""

    def __init__(self, model, params, context):
        super().__init__(model, params, context)
        self.setup_trigger(params)

    def after_step(self, model) -> None:
        super().after_step(model)
        self.after_unlearning_step(model)

    def state_dict(self) -> dict:
        return self.unlearning_state()

    def load_state_dict(self, state: dict) -> None:
        self.load_unlearning_state(state)

    def setup_trigger(self, params) -> None:
        mask, pattern = load_trigger(params.trigger)
        self.mask_logit, self.pattern_logit = _logit(mask), _logit(pattern)
        self.steps_done = 0
        self._last_raw = None

    def stamp(self, raw: torch.Tensor) -> torch.Tensor:
        mask = torch.sigmoid(self.mask_logit).to(raw)
        pattern = torch.sigmoid(self.pattern_logit).to(raw)
        if mask.shape[-2:] != raw.shape[-2:] and mask.shape[-2:] != (1, 1):
            raise ParError(f"the trigger is {list(mask.shape[-2:])} px but the images are {list(raw.shape[-2:])}")
        return (1 - mask) * raw + mask * pattern

    def unlearning_terms(self, model, batch, base_images: torch.Tensor):
        """(image and text features of the batch, scale, the unlearning term), from one forward of ``model``
        over the batch's images and the same images stamped (so DDP sees one call)."""
        ctx = self.context
        raw = to_float(batch.raw_images)
        if self.params.reinvert_every:  # the images the next re-inversion works on
            self._last_raw = raw.detach()
        stamped = normalize(self.stamp(raw), ctx.mean, ctx.std)
        n = base_images.shape[0]
        image_all, text, scale = model(torch.cat([base_images, stamped]), batch.tokens)
        with torch.no_grad():
            target = self.frozen.encode_image(normalize(raw, ctx.mean, ctx.std), normalize=True)
        unlearn = par_distance(F.normalize(image_all[n:], dim=-1), target)
        return image_all[:n], text, scale, unlearn

    def after_unlearning_step(self, model) -> None:
        self.steps_done += 1
        every = self.params.reinvert_every
        if every and self.steps_done % every == 0 and self._last_raw is not None:
            self.reinvert(model, self._last_raw)

    def reinvert(self, model, raw: torch.Tensor) -> None:
        """Ascent on the unlearning term w.r.t. the trigger against ``model`` as it is now, less the size price."""
        p, ctx = self.params, self.context
        mask_logit = self.mask_logit.to(raw.device).clone().requires_grad_(True)
        pattern_logit = self.pattern_logit.to(raw.device).clone().requires_grad_(True)
        optimizer = torch.optim.Adam([mask_logit, pattern_logit], lr=p.reinvert_lr)
        with torch.no_grad():
            target = self.frozen.encode_image(normalize(raw, ctx.mean, ctx.std), normalize=True)
        was_training = model.training
        model.eval()
        for _ in range(p.reinvert_steps):
            mask, pattern = torch.sigmoid(mask_logit), torch.sigmoid(pattern_logit)
            stamped = normalize((1 - mask) * raw + mask * pattern, ctx.mean, ctx.std)
            with unscaled_precision(raw.device):  # the step's precision (the loop's hooks run in it), not fp16
                embedded = model.encode_image(stamped, normalize=True)
            moved = par_distance(embedded.float(), target.float())
            loss = -moved + p.size_price * mask.mean()
            grads = torch.autograd.grad(loss, [mask_logit, pattern_logit])  # the model's own gradients untouched
            mask_logit.grad, pattern_logit.grad = grads
            optimizer.step()
        model.train(was_training)
        mask_logit, pattern_logit = mask_logit.detach(), pattern_logit.detach()
        if torch.distributed.is_available() and torch.distributed.is_initialized():  # one trigger for every rank
            for t in (mask_logit, pattern_logit):
                torch.distributed.all_reduce(t)
                t /= torch.distributed.get_world_size()
        self.mask_logit, self.pattern_logit = mask_logit, pattern_logit

    def unlearning_state(self) -> dict:
        return {"mask_logit": self.mask_logit.cpu(), "pattern_logit": self.pattern_logit.cpu(),
                "steps_done": self.steps_done}

    def load_unlearning_state(self, state: dict) -> None:
        self.mask_logit, self.pattern_logit = state["mask_logit"], state["pattern_logit"]
        self.steps_done = int(state["steps_done"])


@dataclass
class ClipUnlearnParams(ObjectiveParams, UnlearningParams):
    train_logit_scale: bool = False

    def __post_init__(self):
        self.check_unlearning("clip-unlearn")


class ClipUnlearn(Unlearning, Objective):
    """The CLIP loss plus the unlearning term (``invert``'s fine-tuning)."""

    Params = ClipUnlearnParams
    needs_frozen = True

    def __call__(self, model, batch):
        image, text, scale, unlearn = self.unlearning_terms(model, batch, batch.images)
        clip = self.context.contrastive(image, text, scale)
        return {"loss": clip + self.params.weight * unlearn, "clip_loss": clip, "unlearn": unlearn}


@dataclass
class ParUnlearnParams(PARParams, UnlearningParams):
    def __post_init__(self):
        PARParams.__post_init__(self)
        self.check_unlearning("par-unlearn")


class ParUnlearn(Unlearning, PARObjective):
    """PAR's loss plus the unlearning term (``par+invert``'s fine-tuning)."""

    Params = ParUnlearnParams

    def __call__(self, model, batch):
        image, text, scale, unlearn = self.unlearning_terms(model, batch, batch.images)
        terms = self.against_frozen(batch, image, text, scale)
        return {**terms, "loss": terms["loss"] + self.params.weight * unlearn, "unlearn": unlearn}


OBJECTIVES.add("clip-unlearn", ClipUnlearn)
OBJECTIVES.add("par-unlearn", ParUnlearn)
UNLEARNING = {"clip": "clip-unlearn", "par": "par-unlearn"}


TRIGGER_FROM = ("scan", "target")


@dataclass
class InvertParams:
    """``invert:`` in the cleaning settings."""

    scanner: str = "label-inversion"
    scanner_params: dict = field(default_factory=dict)
    # the trigger unlearnt: "scan", the scanner's own; "target", Neural Cleanse's trigger toward the label the
    # scan named (par.scan.trigger_toward), the backdoor's shortcut itself rather than wherever a label-free
    # trigger makes the images collapse
    trigger_from: str = "scan"
    max_images: int = 128  # of the clean pairs' images, as shadow images
    images: Optional[str] = None  # the shadow images' CSV or folder instead (the cleaning data in shards, say)
    top_k: int = 10
    threshold: Optional[float] = None  # the scan's flagging threshold; None: the scanner's documented one
    trigger: Optional[str] = None  # a trigger file handed in: no scan
    weight: float = 1.0
    reinvert_every: Optional[int] = None
    reinvert_steps: int = 5
    reinvert_lr: float = 0.05
    size_price: float = 5.0

    def __post_init__(self):
        if self.trigger_from not in TRIGGER_FROM:
            raise ParError(f"settings 'invert': trigger_from must be one of {list(TRIGGER_FROM)}, got {self.trigger_from!r}")
        _check_unlearning("settings 'invert'", self.weight, self.reinvert_every, self.reinvert_steps,
                          self.reinvert_lr, self.size_price)

    def unlearning(self) -> dict:
        return {k: getattr(self, k) for k in ("weight", "reinvert_every", "reinvert_steps", "reinvert_lr", "size_price")}


REPORT = "defense-report.json"


@defense("invert")
class Invert(MultiStageDefense):
    """Scan, then fine-tune with the base objective plus the unlearning term on the trigger found."""

    stages = ("scan", "finetune")
    base = "clip"  # the objective fine-tuned with, plus the unlearning term when the scan finds a trigger
    report_fields = ("scan_verdict", "scan_target")

    @property
    def objective(self) -> str:
        return self.base

    def clean(self, job: CleaningJob) -> Path:
        self.check(job)  # every setting, before the scan
        return super().clean(job)

    @staticmethod
    def params(job: CleaningJob) -> InvertParams:
        return build(InvertParams, dict(job.settings.get("invert") or {}), "settings 'invert'")

    def scan_config(self, job: CleaningJob, p: InvertParams):
        from par.scan import ScanConfig
        from par.shards import is_shard_pattern

        if not p.images and is_shard_pattern(job.train_data):
            raise ParError(f"settings 'invert': the scan reads shadow images from a CSV or a folder, and the cleaning "
                           f"data {job.train_data} are shards: give them apart, invert: {{images: CSV_OR_FOLDER}}")

        values = {"checkpoint": job.checkpoint, "model": job.model, "images": p.images or job.train_data,
                  "scanner": p.scanner,
                  "scanner_params": dict(p.scanner_params), "max_images": p.max_images, "top_k": p.top_k,
                  "threshold": p.threshold, "image_root": None if p.images else job.image_root,
                  "templates": job.templates,
                  "progress": job.settings.get("progress", True)}
        if job.settings.get("device"):  # the scan on the device the cleaning was asked to run on
            values["device"] = job.settings["device"]
        if job.classnames:
            values["classnames"] = job.classnames
        return build(ScanConfig, values, "settings 'invert' (scan)")

    def scan(self, job: CleaningJob, outputs: dict) -> dict:
        from par.scan.folder import RECORD, folder_name, request_of, run_scan
        from par.scan.run import check

        p = self.params(job)
        if p.trigger:
            load_trigger(p.trigger)
            return {"verdict": "given", "target": None, "trigger": str(p.trigger)}
        cfg = self.scan_config(job, p)
        checked = check(cfg)
        # a finished scan of the same request beside the checkpoint (the scan table's) is reused; otherwise
        # the scan is kept beside the run folder, where a benchmark's seeds and both defenses share it
        request = request_of(cfg, checked)  # hashes the checkpoint and the images: once, for the name and the scan
        name = folder_name(request)
        folder = Path(job.checkpoint).parent / name
        if not (folder / RECORD).exists():
            folder = Path(job.out).parent / "invert-scans" / name
        with file_lock(Path(job.out).parent / "invert-scans.lock"):  # cells side by side share the scans
            record, _ = run_scan(cfg, folder, request, checked)
            trigger = folder / TRIGGER_FILE
            found = record["verdict"] == "backdoored" and trigger.exists()
            result = {"verdict": record["verdict"], "target": record["target"], "family": record["family"],
                      "value": record["value"], "threshold": record["threshold"], "scanner": record["scanner"],
                      "seconds": record["seconds"], "folder": str(folder), "trigger": str(trigger) if found else None,
                      "trigger_from": "scan"}
            if found and p.trigger_from == "target" and record["target"]:
                result.update(self.toward_target(job, cfg, record["target"], Path(job.out).parent / "invert-scans" /
                                                 f"{name}-toward-{digest(record['target'])}.safetensors"))
        return result

    @staticmethod
    def toward_target(job: CleaningJob, cfg, target: str, path: Path) -> dict:
        """Neural Cleanse's trigger toward the scan's target, kept beside the run folder (seeds and both defenses
        share it); the scanner's own trigger stays when no trigger reached the target."""
        from par.scan import trigger_toward
        from par.scan.files import save_trigger

        if not path.exists():
            trigger, success = trigger_toward(cfg, target)
            if trigger is None:
                print(f"{job.out}: no trigger toward {target!r} reached its target; unlearning the scanner's")
                return {"trigger_from": "scan (no trigger toward the target reached it)"}
            path.parent.mkdir(parents=True, exist_ok=True)
            save_trigger(path, trigger.mask, trigger.pattern)
        return {"trigger": str(path), "trigger_from": "target"}

    def finetune(self, job: CleaningJob, outputs: dict) -> Path:
        found = outputs["scan"]
        objective, settings = self._finetune_settings(job, found.get("trigger"))
        atomic_write_text(Path(job.out) / REPORT, json.dumps({
            "scan": found, "unlearned": objective != self.base,
            "note": None if found.get("trigger") else "the scan found no backdoor: fine-tuned with the base "
                                                      f"objective {self.base!r} alone"}, indent=1) + "\n")
        if not found.get("trigger"):
            print(f"{job.out}: the scan found no backdoor; fine-tuning with {self.base!r} alone")
        return FineTune(objective).clean(replace(job, settings=settings, out=str(Path(job.out) / "finetune")))

    def _finetune_settings(self, job: CleaningJob, trigger: Optional[str]) -> tuple:
        """(objective, training settings): the job's, with this defense's objective and its parameters."""
        settings = for_objective({k: v for k, v in job.settings.items() if k != "invert"}, self.base)
        params = dict(settings.pop("objective_params", None) or {})
        objective = self.base
        if trigger:
            objective = UNLEARNING[self.base]
            params.update(trigger=trigger, **self.params(job).unlearning())
        return objective, {**settings, "objective": objective, "objective_params": params}

    def check(self, job: CleaningJob) -> None:
        p = self.params(job)
        if p.trigger:
            mask, pattern = load_trigger(p.trigger)
            size = models.config_image_size(job.model)
            if tuple(pattern.shape[-2:]) != (size, size) or tuple(mask.shape[-2:]) not in ((size, size), (1, 1)):
                raise ParError(f"settings 'invert': trigger {p.trigger} is {pattern.shape[-2]}x{pattern.shape[-1]} px, but "
                               f"encoder {job.model} takes {size}-px images; invert it on this encoder's input size "
                               f"(python -m par scan --model {job.model} ...)")
        else:
            self.scan_config(job, p)  # the scan's settings, and shadow images it can read
        objective, settings = self._finetune_settings(job, None)
        FineTune(objective).check(replace(job, settings=settings))

    def report(self, run_dir: Path, target: str) -> dict:
        path = Path(run_dir) / REPORT
        if not path.exists():
            return {}
        scan = json.loads(path.read_text())["scan"]
        return {"scan_verdict": scan.get("verdict"), "scan_target": scan.get("target") or ""}


@defense("par+invert", "par-invert")
class ParInvert(Invert):
    """PAR's loss plus the unlearning term on the trigger the scan found."""

    base = "par"
