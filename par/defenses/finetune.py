"""``FineTune``: a defense that is one objective run through the shared training loop, and ``defense``,
the one decorator that registers a new defense (an objective and its fine-tuning defense, or a
multi-stage defense)."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

from par import train as loop
from par.defenses.base import DEFENSES, OBJECTIVES, CleaningJob, Defense, Objective, for_objective


class FineTune(Defense):
    """Fine-tune the poisoned checkpoint with one objective; everything else is the job's settings."""

    def __init__(self, objective: str, settings: Optional[dict] = None):
        self.objective = objective
        self.settings = dict(settings or {})  # what makes this defense itself (ft: no augmentation), over the job's

    @property
    def needs_labels(self) -> bool:
        """Whether it trains on class labels (the synthetic world's cleaning pairs carry none)."""
        return OBJECTIVES.get(self.objective).needs_labels

    def config(self, job: CleaningJob) -> loop.TrainConfig:
        values = for_objective({**job.settings, **self.settings}, self.objective)
        given = dict(values.get("objective_params") or {})
        learns = {f.name: f.default for f in dataclasses.fields(OBJECTIVES.get(self.objective).Params)}
        if learns.get("train_logit_scale") is True and "train_logit_scale" not in given:
            # cleaning keeps the temperature fixed, as PAR and every cleaning objective do, where the objective
            # (clip: also pre-training's and poisoning's) would learn it by default
            values["objective_params"] = {**given, "train_logit_scale": False}
        values.update(objective=self.objective, model=job.model, train_data=job.train_data,
                      init_checkpoint=job.checkpoint, out=job.out)
        if job.image_root:
            values["image_root"] = job.image_root
        return loop.train_config(values, f"settings of defense {self.objective!r}")

    def clean(self, job: CleaningJob) -> Path:
        overridden = {k: job.settings[k] for k, v in self.settings.items() if k in job.settings and job.settings[k] != v}
        if overridden:  # the shared budget's value is not this defense's: say so rather than drop it unseen
            fixed = ", ".join(f"{k}: {self.settings[k]}" for k in overridden)
            given = ", ".join(f"{k}: {v}" for k, v in overridden.items())
            print(f"{job.out}: this defense trains with {fixed} (the settings' {given} is not its own)")
        return loop.train(self.config(job), reuse=job.reuse, resume=job.resume)

    def check(self, job: CleaningJob) -> None:
        loop.validate(self.config(job))


def defense(name: str, *aliases: str, objective: Optional[str] = None, settings: Optional[dict] = None):
    """Class decorator registering a defense under ``name`` (and ``aliases``).

    On an ``Objective`` subclass it registers the objective (as ``objective``, default ``name``) and
    the defense ``FineTune(objective, settings)``; on a ``Defense`` subclass, an instance of it.
    Registering a name twice is an error.
    """

    def add(cls):
        if isinstance(cls, type) and issubclass(cls, Objective):
            task = objective or name
            OBJECTIVES.add(task, cls, *[a for a in (name, *aliases) if a != task])
            DEFENSES.add(name, FineTune(task, settings), *[a for a in (task, *aliases) if a != name])
        elif isinstance(cls, type) and issubclass(cls, Defense):
            instance = cls()
            instance.name = name
            DEFENSES.add(name, instance, *aliases)
        else:
            raise TypeError(f"@defense({name!r}) decorates an Objective or a Defense subclass, not {cls!r}")
        return cls

    return add
