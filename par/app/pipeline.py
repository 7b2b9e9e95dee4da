"""The stages the demo and the benchmark share: world -> attack artifacts -> poison -> poisoned model -> clean -> evaluate.

Every stage lands in a folder named by a digest of everything it depends on, so that a
re-run reuses what was already built with the same settings and computes only what is
missing (a finished stage is never overwritten).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from functools import partial
from typing import Callable, Dict, List, Optional, Sequence, Tuple, TypeVar

from par import attacks
from par.app import workers
from par.app.profile import Profile, Robust
from par.config import build
from par.defenses import DEFENSES, CleaningJob, clean
from par.errors import ParError
from par.eval.zeroshot import EvalConfig, evaluate, merged_metrics
from par.models import read_metadata, same_encoder
from par.attacks.poison import PoisonConfig, poison
from par.synthetic import WorldConfig, make_world
from par.train import train, train_config
from par.runs import interrupted
from par.utils import atomic_write_text, digest, file_digest, file_lock

T = TypeVar("T")

IN_MEMORY = {"preload": True}  # the synthetic world is small: decode it once (a training config may say otherwise)


@dataclass
class World:
    path: Path
    key: str
    model: str  # the encoder every stage trains
    cache: Optional[Path] = None  # where stages shared by every run (foundation, poisoned models) live

    @property
    def test_csv(self) -> str:
        return str(self.path / "test.csv")


@dataclass
class Poisoned:
    checkpoint: Path
    key: str
    data: Path  # the poisoned training CSV


def cache_dir(profile: Profile, out: Path) -> Path:
    """The folder for stages every run of this profile shares (world, foundation, poisoned data and
    models, their evaluations): ``cache`` or ``out``.

    The demo and the benchmark name the same cache, so each of these is built once for both; every
    stage's folder is named by a digest of all it depends on, so runs that share a cache never collide.
    """
    return profile.cache or Path(out)


def world_model(profile: Profile) -> str:
    """The encoder of the profile's first training stage (every later stage trains the same one)."""
    scratch = profile.poisoning_mode() == "scratch"
    key, stage = ("pretrain", profile.pretrain) if scratch else ("foundation", profile.foundation)
    model = stage.get("model")
    if not model:
        raise ParError(f"profile {key!r} must name the model")
    return model


def make_world_stage(profile: Profile, out: Path, folder: Optional[str] = None) -> World:
    """The synthetic world, in the shared cache when the profile names one (``world-{key}``)."""
    cfg = build(WorldConfig, profile.world, "profile 'world'")
    # keyed as at the default worker count: workers change how fast a world is drawn, never what it holds
    # (par.synthetic.config_fingerprint), and everything cached after it is keyed by this key
    key = digest(asdict(replace(cfg, workers=WorldConfig.workers)))
    cache = cache_dir(profile, out)
    if folder is None:
        folder = f"world-{key}" if profile.cache else "world"
    path = built_once(cache / folder, lambda: make_world(cfg, cache / folder, reuse=True))
    return World(path=path, key=key, model=world_model(profile), cache=cache)


def foundation_stage(profile: Profile, out: Path, world: World) -> Tuple[Path, str]:
    """(checkpoint, key) of the clean foundation: a tiny CLIP pre-trained once on the never-poisoned
    world, shared by every attack, the never-poisoned reference, BadCLIP's patch, the demo and the benchmark.

    ``foundation_checkpoint`` names a clean checkpoint to use instead of training one. With
    ``poisoning: scratch`` this is the never-poisoned model pre-trained like the poisoned ones.
    """
    if profile.poisoning_mode() == "scratch":
        values = dict(profile.pretrain)
        key = digest([world.key, stage_key(world, values)])
        return _train_stage(values, world, (world.cache or Path(out)) / f"clean-model-{key}", "pretrain"), key
    given = profile.foundation_checkpoint
    if given:  # the user's own clean CLIP (a real pre-trained one, say) stands in for the trained foundation
        check_encoder(given, world.model)
        return given, digest([world.key, file_digest(given)])  # what is made from it depends on the world too
    values = dict(profile.foundation)
    key = digest([world.key, stage_key(world, values)])
    folder = (world.cache or Path(out)) / f"foundation-{key}"
    return _train_stage(values, world, folder, "foundation"), key


# training settings that change how a run reports, never what it computes: left out of the keys of the folders
# built (a changed log_every or learning-curve interval finds the models built before); threads, device and
# preload stay in (they change the arithmetic's order or the random draws)
REPORTING = ("out", "progress", "log_every", "save_every", "tensorboard", "eval_every", "eval_csv", "eval_classnames",
             "eval_templates", "eval_image_root", "eval_attack", "eval_label", "eval_attack_params", "eval_max_images")


def stage_key(world: World, values: dict) -> dict:
    """A training stage's settings as the key of its folder holds them: no reporting settings, portable paths."""
    return portable(world, {k: v for k, v in values.items() if k not in REPORTING})


def portable(world: World, value):
    """``value`` as a key holds it: every path inside the folder the world's models are built in (a foundation
    checkpoint, BadCLIP's patch) relative to that folder, so a checkout moved or cloned elsewhere with its cache
    finds what it built there rather than building it all again."""
    root = os.path.realpath(world.path.parent) + os.sep
    if isinstance(value, str) and os.path.isabs(value) and os.path.realpath(value).startswith(root):
        return "<shared>/" + os.path.relpath(os.path.realpath(value), root)
    if isinstance(value, dict):
        return {k: portable(world, v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable(world, v) for v in value]
    return value


def check_attacks(profile: Profile, names: Sequence[str]) -> None:
    """The target label and each attack's parameters, before the world is drawn or a model trained."""
    from par.synthetic import CLASS_NAMES

    if profile.label not in CLASS_NAMES:
        raise ParError(f"profile label {profile.label!r} is not a class of the world: {', '.join(CLASS_NAMES)}")
    for attack in names:
        attacks.get_trigger(attack, **(profile.attack_params.get(attack) or {}))


def built_once(folder: Path, build: Callable[[], T]) -> T:
    """``build()`` of ``folder`` under a lock beside it: two invocations sharing a cache or an output folder (the
    demo beside a benchmark, two side profiles) that need the same unbuilt folder take turns, and the second
    reuses what the first built rather than training into it at the same time."""
    folder = Path(folder)
    with file_lock(folder.parent / ".locks" / f"{folder.name}.lock"):  # apart: globs of the folders see none
        return build()


def trained(cfg) -> Path:
    """The checkpoint of a shared folder's training ``cfg``: reused when finished, continued from its state when
    stopped after a save, else trained; under the folder's lock (``built_once``)."""
    return built_once(Path(cfg.out), lambda: train(cfg, reuse=True, resume=interrupted(cfg.out)))


def _train_stage(values: dict, world: World, folder: Path, what: str) -> Path:
    if values.get("eval_every"):  # a learning curve on the world's test split, logged as the stage trains
        values = {"eval_csv": world.test_csv, "eval_classnames": str(world.path / "classnames.txt"),
                  "eval_templates": str(world.path / "templates.txt"), **values}
    cfg = train_config({**IN_MEMORY, **values, "train_data": str(world.path / "train.csv"), "out": str(folder)},
                       f"profile {what!r}")
    return trained(cfg)


def prepare_attack_stage(profile: Profile, out: Path, world: World, attack: str, label: str, params: dict) -> dict:
    """``params`` plus whatever the attack builds for itself first (BadCLIP: its patch, optimised
    against the clean foundation, which is built on demand)."""
    context = attacks.AttackContext(
        label=label, model=world.model, clean_data=str(world.path / "clean.csv"),
        templates=str(world.path / "templates.txt"), workdir=world.cache or out,  # shared where models are
        clean_checkpoint=lambda: foundation_stage(profile, out, world),
        settings=dict(profile.attack_prepare.get(attack) or {}))
    return {**params, **attacks.get_trigger(attack, **params).prepare(context)}


def poisoned_model_stage(profile: Profile, out: Path, world: World, attack: str, label: str, attack_params: dict) -> Poisoned:
    """The poisoned tiny CLIP: the foundation fine-tuned on the world's pairs with a share poisoned
    (``poisoning: finetune``), or pre-trained from scratch on them (``poisoning: scratch``)."""
    mode = profile.poisoning_mode()
    shared = world.cache or Path(out)
    values = profile.poison_values(attack)
    poison_key = digest([world.key, attack, label, portable(world, attack_params), values])
    poisoning = build(PoisonConfig, {
        "csv": str(world.path / "train.csv"), "attack": attack, "label": label,
        "out": str(shared / f"poison-{attack}-{poison_key}"), "templates": str(world.path / "templates.txt"),
        "attack_params": attack_params, **values,
    }, "profile 'poison'")
    poisoned_csv = built_once(Path(poisoning.out), lambda: poison(poisoning, reuse=True))
    if mode == "scratch":
        train_values = dict(profile.pretrain)
        key = digest([poison_key, stage_key(world, train_values)])
    else:
        foundation, foundation_key = foundation_stage(profile, out, world)
        train_values = {**profile.poison_finetune, "init_checkpoint": str(foundation)}
        key = digest([poison_key, foundation_key, stage_key(world, train_values)])
    cfg = train_config({**IN_MEMORY, **train_values, "model": world.model, "train_data": str(poisoned_csv),
                        "out": str(shared / f"poisoned-{attack}-{key}")}, f"profile {mode!r} poisoning")
    checkpoint = trained(cfg)
    return Poisoned(checkpoint, key, poisoned_csv)


def build_poisoned(profile: Profile, out: Path, world: World, attack: str, robust: Optional[dict] = None) -> tuple:
    """(model, trigger params, its CA/ASR metrics (and ``poisoned_robust@<eps>`` with ``robust``), what the
    attack built for itself, e.g. BadCLIP's patch) for ``attack``'s poisoned model, built or reused."""
    label = profile.label
    given = dict(profile.attack_params.get(attack) or {})
    params = prepare_attack_stage(profile, out, world, attack, label, given)
    model = poisoned_model_stage(profile, out, world, attack, label, params)
    metrics = evaluate_stage(world, model.checkpoint, attack, label, params, profile.eval)
    artifacts = {k: v for k, v in params.items() if k not in given}
    if robust:
        accuracy = robust_stage(world, model.checkpoint, robust, profile.eval)
        metrics = {**metrics, **{f"poisoned_robust@{eps}": value for eps, value in accuracy.items()}}
    return model, params, metrics, artifacts


def build_poisoned_models(profile: Profile, out: Path, world: World, attacks: List[str], robust: Optional[dict] = None,
                          beside: Sequence[Callable[[], object]] = ()) -> Dict[str, Tuple[Optional[tuple], str]]:
    """``(build_poisoned's tuple, "")``, or ``(None, its one-line error)``, per attack, ``profile.jobs`` models
    trained at once; the trainings ``beside`` (the scan table's clean controls) take turns with them, their
    failures left for whoever reuses them to meet. With more than one job the foundation is trained first,
    alone: every other model starts from it."""
    if profile.jobs > 1:
        foundation_stage(profile, out, world)
    tasks = [partial(build_poisoned, profile, out, world, attack, robust) for attack in attacks] + list(beside)
    done = list(workers.each(workers.attempt, tasks, profile.jobs))  # every task, those beside included
    return dict(zip(attacks, done))


def check_encoder(checkpoint: Path, model: str) -> None:
    """A clear error when ``checkpoint`` was saved for another encoder than the profile's."""
    if not Path(checkpoint).is_file():
        raise ParError(f"foundation checkpoint not found: {checkpoint}")
    saved = read_metadata(checkpoint).get("model")
    if saved and not same_encoder(saved, model):
        raise ParError(f"{checkpoint} holds a {saved} model but the profile trains {model}")


def check_defense(profile: Profile, defense: str, settings: dict) -> None:
    """``defense`` with ``settings`` as ``clean_stage`` would run it on the profile's world, checked before any
    work (``Defense.check``): a defense that trains on class labels cannot clean with the world's caption pairs."""
    if DEFENSES.get(defense).needs_labels:
        raise ParError(f"defense {defense!r} trains on class labels; the synthetic world has caption pairs only")
    DEFENSES.get(defense).check(CleaningJob(
        checkpoint="poisoned.pt", model=world_model(profile), train_data="clean.csv", out="cleaned", settings=settings,
        poisoned_data="poisoned.csv", classnames="classnames.txt", templates="templates.txt"))


def clean_stage(world: World, defense: str, poisoned: Poisoned, settings: dict, run_dir: Path, reuse: bool,
                train_data: Optional[str] = None) -> Path:
    """Cleans ``poisoned`` with ``defense`` on the world's clean pairs (or ``train_data``)."""
    job = CleaningJob(checkpoint=str(poisoned.checkpoint), model=world.model,
                      train_data=train_data or str(world.path / "clean.csv"), out=str(run_dir),
                      settings={**IN_MEMORY, **settings}, poisoned_data=str(poisoned.data),
                      classnames=str(world.path / "classnames.txt"), templates=str(world.path / "templates.txt"),
                      reuse=reuse, resume=interrupted(run_dir) if reuse else None)  # a cell stopped mid-way goes on
    return built_once(run_dir, lambda: clean(defense, job)) if reuse else clean(defense, job)


def evaluate_stage(world: World, checkpoint: Path, attack: str, label: str, attack_params: dict,
                   eval_values: Optional[dict] = None) -> dict:
    """CA and ASR of ``checkpoint`` on the world's test split (records kept beside the checkpoint)."""
    # keyed by the checkpoint's bytes and the world too: a checkpoint given by the user (its foundation) is evaluated
    # beside itself, in a folder it may share with others, in every world
    key = digest([file_digest(checkpoint), world.key, label, portable(world, attack_params), eval_values])
    results = Path(checkpoint).parent / f"results-{attack}-{key}.jsonl"
    if results.exists():  # evaluated before with these settings: a finished run's checkpoint never changes
        return merged_metrics([json.loads(line) for line in results.read_text().splitlines()])
    records = evaluate(build(EvalConfig, {
        "checkpoint": str(checkpoint), "model": world.model, "data": world.test_csv,
        "classnames": str(world.path / "classnames.txt"), "templates": str(world.path / "templates.txt"),
        "attack": attack, "label": label, "attack_params": attack_params, **(eval_values or {}),
    }, "profile 'eval'"))
    # whole or not at all: a results file cut short by an interrupt would be taken for the evaluation next time
    atomic_write_text(results, "".join(json.dumps(r) + "\n" for r in records))
    return merged_metrics(records)


def robust_settings(robust: Optional[Robust]) -> Optional[dict]:
    """A profile's ``robust`` part as EvalConfig keys; None when absent."""
    return robust.eval_settings() if robust else None


def robust_stage(world: World, checkpoint: Path, robust: dict, eval_values: Optional[dict] = None) -> dict:
    """Robust zero-shot accuracy of ``checkpoint`` on the world's test split: ``{eps label: accuracy}``
    (records kept beside the checkpoint, keyed by the settings)."""
    from par.eval.robust import eps_label

    values = {**(eval_values or {}), **robust}
    results = Path(checkpoint).parent / f"robust-{digest([file_digest(checkpoint), world.key, values])}.jsonl"
    if results.exists():
        records = [json.loads(line) for line in results.read_text().splitlines()]
    else:
        records = evaluate(build(EvalConfig, {
            "checkpoint": str(checkpoint), "model": world.model, "data": world.test_csv,
            "classnames": str(world.path / "classnames.txt"), "templates": str(world.path / "templates.txt"),
            "out": str(results), "progress": True, **values}, "profile 'robust'"))
    return {eps_label(r["robust"]["eps"]): r["metrics"][f"robust_top1@{eps_label(r['robust']['eps'])}"]
            for r in records if "robust" in r}
