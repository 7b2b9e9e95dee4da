"""The stages the demo and the benchmark share: world -> attack artifacts -> poison -> poisoned model -> clean -> evaluate.

Every stage lands in a folder named by a digest of everything it depends on, so that a
re-run reuses what was already built with the same settings and computes only what is
missing (a finished stage is never overwritten).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Tuple

from par import triggers
from par.config import build, load_yaml
from par.defenses import CleaningJob, clean
from par.errors import ParError
from par.evaluate import EvalConfig, evaluate, merged_metrics
from par.poison import PoisonConfig, poison
from par.synthetic import WorldConfig, make_world
from par.train import train, train_config
from par.utils import digest

REPO = Path(__file__).resolve().parent.parent


def stage_config(spec, what: str) -> dict:
    """A stage's settings: an inline mapping, or a YAML path (relative to the working directory or the repo)."""
    if isinstance(spec, dict):
        return dict(spec)
    if isinstance(spec, str):
        path = Path(spec)
        return load_yaml(path if path.is_absolute() or path.exists() else REPO / path)
    raise ParError(f"profile key {what!r} must be a mapping or a YAML file path")


@dataclass
class World:
    path: Path
    key: str
    model: str  # the encoder every stage trains

    @property
    def test_csv(self) -> str:
        return str(self.path / "test.csv")


@dataclass
class Poisoned:
    checkpoint: Path
    key: str
    data: Path  # the poisoned training CSV


def make_world_stage(profile: dict, out: Path, folder: str = "world") -> World:
    cfg = build(WorldConfig, profile.get("world", {}), "profile 'world'")
    path = make_world(cfg, out / folder, reuse=True)
    model = stage_config(profile.get("pretrain", {}), "pretrain").get("model")
    if not model:
        raise ParError("profile 'pretrain' must name the model")
    return World(path=path, key=digest(asdict(cfg)), model=model)


def clean_model_stage(profile: dict, out: Path, world: World) -> Tuple[Path, str]:
    """(checkpoint, key) of a tiny CLIP pre-trained like the poisoned ones on the never-poisoned world."""
    pretrain_values = stage_config(profile.get("pretrain", {}), "pretrain")
    clean_key = digest([world.key, pretrain_values])
    checkpoint = train(train_config({**pretrain_values, "train_csv": str(world.path / "train.csv"),
                                     "out": str(out / f"clean-model-{clean_key}")}, "profile 'pretrain'"), reuse=True)
    return checkpoint, clean_key


def prepare_attack_stage(profile: dict, out: Path, world: World, attack: str, label: str, params: dict) -> dict:
    """``params`` plus whatever the attack builds for itself first (BadCLIP: its patch, optimised
    against the never-poisoned model, which is built on demand)."""
    context = triggers.AttackContext(
        label=label, model=world.model, clean_data=str(world.path / "clean.csv"),
        templates=str(world.path / "templates.txt"), workdir=out,
        clean_checkpoint=lambda: clean_model_stage(profile, out, world),
        settings=dict((profile.get("attack_prepare") or {}).get(attack) or {}))
    return {**params, **triggers.get_trigger(attack, **params).prepare(context)}


def poisoned_model_stage(profile: dict, out: Path, world: World, attack: str, label: str, attack_params: dict) -> Poisoned:
    """A tiny CLIP pre-trained on the world poisoned with ``attack``."""
    poison_values = {"rate": 0.05, "seed": 0, **profile.get("poison", {})}
    poison_key = digest([world.key, attack, label, attack_params, poison_values])
    poisoned_csv = poison(build(PoisonConfig, {
        "csv": str(world.path / "train.csv"), "attack": attack, "label": label,
        "out": str(out / f"poison-{attack}-{poison_key}"), "templates": str(world.path / "templates.txt"),
        "attack_params": attack_params, **poison_values,
    }, "profile 'poison'"), reuse=True)
    pretrain_values = stage_config(profile.get("pretrain", {}), "pretrain")
    key = digest([poison_key, pretrain_values])
    checkpoint = train(train_config({
        **pretrain_values, "train_csv": str(poisoned_csv), "out": str(out / f"poisoned-{attack}-{key}"),
    }, "profile 'pretrain'"), reuse=True)
    return Poisoned(checkpoint, key, poisoned_csv)


def clean_stage(world: World, defense: str, poisoned: Poisoned, settings: dict, run_dir: Path, reuse: bool,
                train_csv: Optional[str] = None) -> Path:
    """Cleans ``poisoned`` with ``defense`` on the world's clean pairs (or ``train_csv``)."""
    return clean(defense, CleaningJob(checkpoint=str(poisoned.checkpoint), model=world.model,
                                      train_csv=train_csv or str(world.path / "clean.csv"), out=str(run_dir),
                                      settings=settings, poisoned_data=str(poisoned.data), reuse=reuse))


def evaluate_stage(world: World, checkpoint: Path, attack: str, label: str, attack_params: dict,
                   eval_values: Optional[dict] = None) -> dict:
    """CA and ASR of ``checkpoint`` on the world's test split (records kept beside the checkpoint)."""
    results = Path(checkpoint).parent / f"results-{attack}-{digest([label, attack_params, eval_values])}.jsonl"
    if results.exists():  # evaluated before with these settings: a finished run's checkpoint never changes
        return merged_metrics([json.loads(line) for line in results.read_text().splitlines()])
    records = evaluate(EvalConfig(
        checkpoint=str(checkpoint), model=world.model, data=world.test_csv,
        classnames=str(world.path / "classnames.txt"), templates=str(world.path / "templates.txt"),
        attack=attack, label=label, attack_params=attack_params, out=str(results), **(eval_values or {}),
    ))
    return merged_metrics(records)
