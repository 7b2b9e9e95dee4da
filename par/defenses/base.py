"""What every defense is made of: the training objective the loop calls, and the defense the benchmark runs.

An **objective** (the shape of open_clip's ``TrainingTask``) owns everything about itself that the
loop must not know: its typed settings (``Params``, filled from the config's ``objective_params``),
which of the model's parameters train, its frozen reference model if it has one, its random state
(saved in resumable states), and hooks the training step calls for every objective alike
(``after_step``, ``on_epoch_start``). The loop only calls ``objective(model, batch)`` and logs the
terms it returns. Every objective runs the trainable model through one forward call of ``model``
(the DDP wrapper when distributed), so gradients are synchronised; what the loop wraps is the
objective's ``step_module`` of the CLIP model (the model itself, or a part of it).

A **defense** turns a poisoned checkpoint into a cleaned one, given a ``CleaningJob`` (the same
poisoned model, clean data and training budget for every defense), and says what the benchmark
should report about it (``report_fields``/``report``/``tables``, ``train_seconds``). Two shapes:
``FineTune(objective)`` (``par.defenses.finetune``) and ``MultiStageDefense`` (named stages run in
order, e.g. EftCLIP's detect -> curate -> fine-tune).

Both registries load the built-in defenses (``par.defenses``) on first lookup, so a caller that
only imports this module still finds them; a plugin registers its own with
``par.defenses.defense``.
"""
from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from par.config import build
from par.errors import ParError
from par.registry import Registry

OBJECTIVES: Registry = Registry("objective", builtins="par.defenses")
DEFENSES: Registry = Registry("defense", builtins="par.defenses")


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
    gather: Any = None  # local rows -> every process's rows in rank order, on each (distributed); None in one process


@dataclass
class ObjectiveParams:
    # the temperature: learnt when pre-training; every cleaning keeps it fixed unless told (FineTune.config)
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

    def second_view(self, batch: Batch, image_transform, rng) -> tuple:
        """(normalised images, token ids): every raw image through ``image_transform`` on the device and
        every caption rewritten by EDA drawing from ``rng``, the augmented view CleanCLIP and RoCLIP train on."""
        from par.augment import normalize
        from par.data import to_float
        from par.text_augment import eda_batch

        if batch.captions is None:
            raise RuntimeError(f"{type(self).__name__} needs the batch's captions")
        augmented = torch.stack([image_transform(image) for image in batch.raw_images])  # per image: its own draws
        return (normalize(to_float(augmented), self.context.mean, self.context.std),
                self.context.tokenizer(eda_batch(batch.captions, rng)).to(batch.tokens.device))


def objective_params(name: str, values: Optional[dict] = None) -> ObjectiveParams:
    """The typed settings of objective ``name`` from a config's ``objective_params`` mapping."""
    cls = OBJECTIVES.get(name)
    return build(cls.Params, dict(values or {}), f"objective_params of {OBJECTIVES.canonical(name)!r}")


def make_objective(name: str, values: Optional[dict], model: torch.nn.Module, context: TaskContext) -> Objective:
    return OBJECTIVES.get(name)(model, objective_params(name, values), context)


def for_objective(settings: dict, objective: str) -> dict:
    """``settings`` (a training-config mapping) for training with ``objective``, without its ``objective``
    key: a mapping written for another objective keeps its budget, not its ``objective_params``."""
    values = dict(settings)
    written_for = values.pop("objective", None)
    if written_for is not None and OBJECTIVES.canonical(written_for) != OBJECTIVES.canonical(objective):
        values.pop("objective_params", None)
    return values


def _as_tuple(value):
    """``random.Random`` states come back from a checkpoint as lists; ``setstate`` wants tuples."""
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


@dataclass
class CleaningJob:
    """One cleaning: the poisoned checkpoint, the defender's clean data and the training settings.

    ``settings`` is a training-config mapping (steps, batch, lr, augmentation, ``objective_params``
    ...): the budget shared by every defense, merged with this defense's own settings.
    ``poisoned_data`` is the training set the model was poisoned with, for defenses whose threat
    model gives the defender that data (detection); fine-tuning defenses never read it.
    ``classnames``/``templates`` are the defender's label space, for defenses that reason in labels.
    """

    checkpoint: str
    model: str
    train_data: str
    out: str
    settings: dict = field(default_factory=dict)
    image_root: Optional[str] = None
    poisoned_data: Optional[str] = None
    classnames: Optional[str] = None
    templates: str = "openai"
    reuse: bool = False
    resume: Optional[str] = None


class Defense:
    """Base: ``clean(job)`` returns the cleaned checkpoint; the other methods are what the benchmark asks."""

    name = "defense"
    needs_labels = False  # trains on class labels (the synthetic world's cleaning pairs carry none)
    report_fields: Sequence[str] = ()  # benchmark columns this defense fills beside CA/ASR
    objective: Optional[str] = None  # what its fine-tuning trains with, when it fine-tunes (see for_objective)

    def clean(self, job: CleaningJob) -> Path:
        raise NotImplementedError

    def check(self, job: CleaningJob) -> None:
        """Raises on settings this defense cannot run with, before any work (configs are checked so)."""

    def report(self, run_dir: Path, target: str) -> Dict[str, Any]:
        """This defense's ``report_fields`` for one finished cleaning in ``run_dir`` (target label ``target``)."""
        return {}

    def tables(self, rows: List[dict], attacks: List[str], target: str) -> List[str]:
        """Markdown lines the benchmark adds after its main table, from this defense's result rows."""
        return []

    def train_seconds(self, run_dir: Path) -> Optional[float]:
        """Seconds spent training in ``run_dir``, its stage subfolders included (also for a reused run);
        None when nothing there logged a training."""
        total, found = 0.0, False
        for log in sorted(Path(run_dir).rglob("metrics.jsonl")):
            lines = log.read_text().splitlines()
            if lines:
                total, found = total + json.loads(lines[-1])["elapsed_s"], True
        return round(total, 1) if found else None


class MultiStageDefense(Defense):
    """Runs the methods named in ``stages`` in order: ``stage(job, outputs) -> output``; the last
    stage's output is the cleaned checkpoint. Stages keep their files under ``job.out``."""

    stages: Sequence[str] = ()

    def clean(self, job: CleaningJob) -> Path:
        if not self.stages:
            raise ParError(f"defense {self.name!r} has no stages")
        outputs: dict = {}
        for stage in self.stages:
            outputs[stage] = getattr(self, stage)(job, outputs)
        return Path(outputs[self.stages[-1]])


def clean(name: str, job: CleaningJob) -> Path:
    return DEFENSES.get(name).clean(job)
