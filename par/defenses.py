"""Defenses, found by name: what the benchmark compares and ``trigger.sh`` runs.

A defense turns a poisoned checkpoint into a cleaned one, given a ``CleaningJob`` (the same
poisoned model, clean data and training budget for every defense). Two shapes:

* ``FineTune(objective)``: fine-tune with one training objective (``par.objectives``) through
  the shared loop: ``ft`` (plain CLIP loss), ``par``, ``cleanclip``, ``roclip``;
* ``MultiStageDefense``: named stages run in order, each seeing the job and the earlier
  stages' outputs, the last returning the checkpoint (e.g. detect -> curate -> fine-tune).

A new defense is an instance registered here or from a plugin (``par.plugins``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from par.errors import ParError
from par.objectives import OBJECTIVES
from par.registry import Registry
from par.train import TrainConfig, train, train_config

DEFENSES: Registry = Registry("defense")


@dataclass
class CleaningJob:
    """One cleaning: the poisoned checkpoint, the defender's clean data and the training settings.

    ``settings`` is a training-config mapping (steps, batch, lr, augmentation, ``objective_params``
    ...): the budget shared by every defense, merged with this defense's own settings.
    ``poisoned_data`` is the training set the model was poisoned with, for defenses whose threat
    model gives the defender that data (detection); fine-tuning defenses never read it.
    """

    checkpoint: str
    model: str
    train_csv: str
    out: str
    settings: dict = field(default_factory=dict)
    image_root: Optional[str] = None
    poisoned_data: Optional[str] = None
    reuse: bool = False
    resume: Optional[str] = None


class Defense:
    name = "defense"
    needs_labels = False

    def clean(self, job: CleaningJob) -> Path:
        """Returns the cleaned checkpoint."""
        raise NotImplementedError


class FineTune(Defense):
    """Fine-tune the poisoned checkpoint with one objective; everything else is the job's settings."""

    def __init__(self, objective: str):
        self.objective = objective

    @property
    def needs_labels(self) -> bool:
        """Whether it trains on class labels (the synthetic world's cleaning pairs carry none)."""
        return OBJECTIVES.get(self.objective).needs_labels

    def config(self, job: CleaningJob) -> TrainConfig:
        values = dict(job.settings)
        written_for = values.pop("objective", None)
        if written_for is not None and OBJECTIVES.canonical(written_for) != OBJECTIVES.canonical(self.objective):
            values.pop("objective_params", None)  # settings of another objective: not this one's
        values.update(objective=self.objective, model=job.model, train_csv=job.train_csv,
                      init_checkpoint=job.checkpoint, out=job.out)
        if job.image_root:
            values["image_root"] = job.image_root
        return train_config(values, f"settings of defense {self.objective!r}")

    def clean(self, job: CleaningJob) -> Path:
        return train(self.config(job), reuse=job.reuse, resume=job.resume)


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


DEFENSES.add("ft", FineTune("clip"), "clip")
DEFENSES.add("par", FineTune("par"))
DEFENSES.add("cleanclip", FineTune("cleanclip"))
DEFENSES.add("roclip", FineTune("roclip"))
DEFENSES.add("fare", FineTune("fare"))
DEFENSES.add("tecoa", FineTune("tecoa"))


def clean(name: str, job: CleaningJob) -> Path:
    return DEFENSES.get(name).clean(job)
