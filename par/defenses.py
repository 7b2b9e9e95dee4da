"""Defenses, found by name: what the benchmark compares and ``trigger.sh`` runs.

A defense turns a poisoned checkpoint into a cleaned one, given a ``CleaningJob`` (the same
poisoned model, clean data and training budget for every defense). Two shapes:

* ``FineTune(objective)``: fine-tune with one training objective (``par.objectives``) through
  the shared loop: ``ft`` (plain CLIP loss), ``par``, ``cleanclip``, ``roclip``;
* ``MultiStageDefense``: named stages run in order, each seeing the job and the earlier
  stages' outputs, the last returning the checkpoint: ``eftclip`` (detect -> curate -> fine-tune).
  A defense may leave ``defense-report.json`` in its run folder (the benchmark reports it).

A new defense is an instance registered here or from a plugin (``par.plugins``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import List, Optional, Sequence

from par.errors import ParError
from par.config import build
from par.objectives import OBJECTIVES
from par.registry import Registry
from par.train import TrainConfig, train, train_config
from par.utils import atomic_write, atomic_write_text, digest, file_digest

DEFENSES: Registry = Registry("defense")


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
    train_csv: str
    out: str
    settings: dict = field(default_factory=dict)
    image_root: Optional[str] = None
    poisoned_data: Optional[str] = None
    classnames: Optional[str] = None
    templates: str = "openai"
    reuse: bool = False
    resume: Optional[str] = None


class Defense:
    name = "defense"
    needs_labels = False

    def clean(self, job: CleaningJob) -> Path:
        """Returns the cleaned checkpoint."""
        raise NotImplementedError

    def check(self, job: CleaningJob) -> None:
        """Raises on settings this defense cannot run with, before any work (configs are checked so)."""


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

    def check(self, job: CleaningJob) -> None:
        from par.train import validate

        validate(self.config(job))


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


@dataclass
class EftCLIPParams:
    """The ``eftclip`` mapping of a cleaning job's settings (the rest is the fine-tuning budget)."""

    oracle: str = "world-classifier"
    oracle_params: dict = field(default_factory=dict)
    theta: float = 0.66  # confidence at which a claim counts
    tau: int = 3  # length of the oracle's object list
    calibrate: float = 0.2  # share of the clean pairs held out of the oracle to calibrate the victim ranking
    views: List[str] = field(default_factory=lambda: ["clip", "caption"])
    victims: int = 1  # top-ranked labels treated as victims
    victim_weight: int = 2  # unflagged pairs of a victim label appear this many times in the curated set


class EftCLIP(MultiStageDefense):
    """EftCLIP (Hossain et al.): detect the pairs where the poisoned CLIP and an oracle disagree in the
    poisoned training set (``par.detection``), pinpoint the victim label, curate a compact set (flagged
    pairs dropped, the victim label's unflagged pairs up-weighted) and fine-tune on it with the CLIP loss.

    Its threat model gives the defender the poisoned training set (``job.poisoned_data``); a learning
    oracle learns from the job's clean pairs (``job.train_csv``) only.
    """

    name = "eftclip"
    stages = ("detect", "curate", "finetune")

    @staticmethod
    def params(job: CleaningJob) -> EftCLIPParams:
        return build(EftCLIPParams, dict(job.settings.get("eftclip") or {}), "settings 'eftclip'")

    def detect(self, job: CleaningJob, outputs: dict) -> dict:
        from par.detection import DetectConfig, detect

        if not job.poisoned_data:
            raise ParError("eftclip screens the data the model was poisoned with: give it (--poisoned-data)")
        if not job.classnames:
            raise ParError("eftclip reasons in class labels: give the class names (--classnames)")
        p = self.params(job)
        inputs = [file_digest(job.checkpoint), file_digest(job.poisoned_data), file_digest(job.train_csv),
                  job.classnames, job.templates, p.oracle, p.oracle_params, p.theta, p.tau, p.views,
                  p.calibrate]
        # beside the run folder and keyed by what it depends on: a benchmark's seeds share one detection
        folder = Path(job.out).parent / "eftclip-detections" / digest(inputs)
        summary = detect(DetectConfig(
            checkpoint=job.checkpoint, model=job.model, data=job.poisoned_data, classnames=job.classnames,
            templates=job.templates, out=str(folder), oracle=p.oracle, oracle_params=p.oracle_params,
            clean_data=job.train_csv, oracle_cache=str(Path(job.out).parent / "oracles"), image_root=job.image_root,
            theta=p.theta, tau=p.tau, views=p.views, calibrate=p.calibrate,
            progress=job.settings.get("progress", True)))
        return {**summary, "folder": str(folder)}

    def curate(self, job: CleaningJob, outputs: dict) -> Path:
        import pandas as pd

        from par.data import image_paths, load_classnames, mentions_label, read_csv

        path = Path(job.out) / "curate" / "curated.csv"
        if path.exists():  # curated before from the same detection (the run folder is keyed by the job)
            return path
        p, summary = self.params(job), outputs["detect"]
        victims = [v["label"] for v in summary["victims"][: p.victims] if v["excess"] > 0]
        flagged = read_csv(Path(summary["folder"]) / "detections.csv", ["row", "flagged"])["flagged"].astype(bool).tolist()
        frame = read_csv(job.poisoned_data, ["image", "caption"])
        frame["image"] = [str(path.resolve()) for path in image_paths(frame, job.poisoned_data, job.image_root)]
        kept = frame[[not f for f in flagged]][["image", "caption"]]
        if kept.empty:
            raise ParError(f"eftclip flagged all {len(frame)} pairs: nothing is left to fine-tune on (the oracle "
                           "disagrees with everything; check it, or raise tau / theta)")
        names = set(load_classnames(job.classnames))
        victim_rows = kept[[any(mentions_label(c, v) for v in victims if v in names) for c in kept["caption"]]]
        curated = pd.concat([kept] + [victim_rows] * (p.victim_weight - 1), ignore_index=True)
        atomic_write_text(Path(job.out) / "defense-report.json", json.dumps({
            "detection": {"rows": summary["rows"], "flagged": summary["flagged"], "victim": summary["victim"],
                          "victims": summary["victims"], "metrics": summary.get("metrics"),
                          "folder": summary["folder"]},
            "curated_pairs": len(curated), "dropped": int(sum(flagged)),
            "victim_pairs_upweighted": len(victim_rows)}, indent=1) + "\n")
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: curated.to_csv(tmp, index=False))
        return path

    def finetune(self, job: CleaningJob, outputs: dict) -> Path:
        return FineTune("clip").clean(self._finetune_job(job, str(outputs["curate"])))

    @staticmethod
    def _finetune_job(job: CleaningJob, curated: str) -> CleaningJob:
        settings = {k: v for k, v in job.settings.items() if k != "eftclip"}
        return replace(job, train_csv=curated, settings=settings, out=str(Path(job.out) / "finetune"), image_root=None)

    def check(self, job: CleaningJob) -> None:
        from par.oracles import ORACLES

        ORACLES.canonical(self.params(job).oracle)
        FineTune("clip").check(self._finetune_job(job, job.train_csv))


DEFENSES.add("ft", FineTune("clip"), "clip")
DEFENSES.add("par", FineTune("par"))
DEFENSES.add("cleanclip", FineTune("cleanclip"))
DEFENSES.add("roclip", FineTune("roclip"))
DEFENSES.add("fare", FineTune("fare"))
DEFENSES.add("tecoa", FineTune("tecoa"))
DEFENSES.add("eftclip", EftCLIP())


def clean(name: str, job: CleaningJob) -> Path:
    return DEFENSES.get(name).clean(job)
