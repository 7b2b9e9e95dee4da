"""The demo's and the benchmark's profile, read once from its YAML into typed fields.

A misspelt key is an error at load time, not a setting silently ignored; every path is resolved
once, so the stages read settings, never files.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

from par.config import build, load_yaml
from par.errors import ParError
from par.synthetic import WorldConfig

STAGES = ("foundation", "poison_finetune", "pretrain", "clean")  # inline mappings or YAML files
PATHS = ("cache", "foundation_checkpoint")
NESTED = ("synthetic_cleaning", "robust", "defense_settings", "scan", "quick")  # read by from_mapping, not by build


@dataclass(frozen=True)
class SyntheticCleaning:
    """PAR "without real data": the cleaning pairs come from a second world of another style."""

    world: dict = field(default_factory=dict)  # WorldConfig keys; its digest names the world's folder
    defenses: List[str] = field(default_factory=list)


@dataclass(frozen=True)
class Robust:
    """Robust zero-shot accuracy (L-inf APGD) of the poisoned, never-poisoned and cleaned models."""

    eps: List[Union[str, float]] = field(default_factory=list)  # 4/255 as the field writes it, or a number
    attacks: Optional[List[str]] = None
    steps: Optional[int] = None
    max_images: Optional[int] = None

    def eval_settings(self) -> dict:
        """These settings as EvalConfig keys (``robust_eps`` ...); only the given ones, so that the
        digest naming the results stays the same for the same profile."""
        from par.eval.robust import parse_eps

        if not self.eps:
            raise ParError("profile 'robust' needs 'eps', e.g. [2/255, 4/255]")
        out = {"robust_eps": [parse_eps(e, "profile 'robust' eps") for e in self.eps]}
        for key in ("attacks", "steps", "max_images"):
            if getattr(self, key) is not None:
                out[f"robust_{key}"] = getattr(self, key)
        return out


@dataclass(frozen=True)
class ScanBench:
    """The scan table: every scanner on every poisoned model and on clean controls, which are the
    foundation, the poisoning fine-tune at 0 % poison under other seeds (identical but for the poison)
    and shorter benign fine-tunes (the ``clean`` budget as a plain CLIP fine-tune) on the clean split."""

    scanners: List[str] = field(default_factory=lambda: ["label-inversion", "decree"])
    scanner_params: Dict[str, dict] = field(default_factory=dict)  # per scanner
    images: str = "clean"  # the world split whose images are the shadow images (unlabelled)
    max_images: int = 128
    seed: int = 0
    zero_poison_seeds: List[int] = field(default_factory=lambda: [1, 2, 3])
    benign_seeds: List[int] = field(default_factory=lambda: [0, 1, 2, 3])

    def __post_init__(self):
        if self.images not in ("train", "clean", "test"):
            raise ParError(f"profile 'scan' images must be a world split (train, clean or test), got {self.images!r}")
        if not self.scanners:
            raise ParError("profile 'scan' needs at least one scanner")
        for key in ("zero_poison_seeds", "benign_seeds"):
            seeds = getattr(self, key)
            if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
                raise ParError(f"profile 'scan' {key} must be whole numbers >= 0, got {seeds!r}")
            if len(set(seeds)) != len(seeds):
                raise ParError(f"profile 'scan' {key} lists a seed twice: {seeds!r}")
        if isinstance(self.max_images, bool) or not isinstance(self.max_images, int) or self.max_images < 1:
            raise ParError(f"profile 'scan' max_images must be a whole number >= 1, got {self.max_images!r}")


def _canonical_keys(mapping: dict, registry, key: str) -> dict:
    """``mapping`` with its keys under their registered names; two keys naming one thing are an error."""
    canonical = {registry.canonical(k): v for k, v in mapping.items()}
    if len(canonical) != len(mapping):
        raise ParError(f"profile key {key!r} names one {registry.kind} twice (under aliases): {list(mapping)}")
    return canonical


def _canonical_scan(scan: ScanBench) -> ScanBench:
    """``scan`` with its scanners (and the keys of ``scanner_params``) under their registered names, every
    scanner built with its settings: an unknown scanner or setting is an error before any model is trained."""
    from par.scan import SCANNERS, make_scanner

    names = [SCANNERS.canonical(n) for n in scan.scanners]
    params = {k: dict(v or {}) for k, v in _canonical_keys(scan.scanner_params, SCANNERS, "scan.scanner_params").items()}
    stray = sorted(set(params) - set(names))
    if stray:
        raise ParError(f"profile 'scan' scanner_params has settings for {stray}, which its scanners {names} do not list")
    for name in names:
        make_scanner(name, params.get(name))
    return dataclasses.replace(scan, scanners=names, scanner_params=params)


def check_named_once(names: Sequence[str], what: str) -> None:
    """Refuses registered names (already canonical) listed twice: two cells or models of one name would be
    built into one folder side by side, and count twice."""
    twice = sorted({n for n in names if list(names).count(n) > 1})
    if twice:
        raise ParError(f"{what} {twice} more than once (under one name or its aliases)")


def _check_settings(plain: "Profile", read: dict) -> None:
    """The stages' training settings and the evaluation settings, as the stages will read them, before any
    work: a misspelt key in them would otherwise surface when its stage runs, hours in."""
    from par.eval.zeroshot import EvalConfig
    from par.train import train_config

    for key in STAGES:  # the keys and their types (their values are validated as each stage starts)
        if read.get(key):
            train_config({"model": "-", **read[key], "train_data": "-", "out": "-"}, f"profile {key!r}")
    if plain.eval:
        build(EvalConfig, {"checkpoint": "-", "model": "-", "data": "-", **plain.eval}, "profile 'eval'")
    # the poisoning of every attack named, and what an attack builds first: misspelt, they would fail (or go
    # unused) once the foundation has trained
    from par.attacks import TRIGGERS
    from par.attacks.poison import PoisonConfig

    unknown = sorted(set(plain.poison) - {"rate", "num", "seed"})
    if unknown:
        raise ParError(f"profile 'poison' has unknown setting(s) {unknown}; it takes rate, num and seed")
    for attack in dict.fromkeys([*(plain.attacks or []), plain.attack, *plain.poison_rates]):
        build(PoisonConfig, {"csv": "-", "attack": attack, "label": "-", "out": "-", **plain.poison_values(attack)},
              f"profile 'poison' for {attack}")
    for attack, settings in plain.attack_prepare.items():
        if not isinstance(settings, dict):
            raise ParError(f"profile 'attack_prepare' for {attack} must be a mapping, got {settings!r}")
        TRIGGERS.get(attack).check_prepare(settings)


def _canonical_names(profile: "Profile") -> "Profile":
    """``profile`` with every attack and defense, in lists and as keys of per-attack / per-defense settings,
    under its registered name: settings given under an alias (``badnet-stripes``) are not silently left
    unused; an unknown name, a name listed twice or two keys naming one thing are errors before any work."""
    from par.attacks import TRIGGERS
    from par.defenses import DEFENSES

    def names(key, registry):
        value = getattr(profile, key)
        if value is None:
            return None
        canonical = [registry.canonical(n) for n in value]
        check_named_once(canonical, f"profile key {key!r} names")
        return canonical

    if len(set(profile.seeds)) != len(profile.seeds):
        raise ParError(f"profile key 'seeds' lists a seed twice: {profile.seeds!r}")
    return dataclasses.replace(
        profile, attack=TRIGGERS.canonical(profile.attack), defense=DEFENSES.canonical(profile.defense),
        attacks=names("attacks", TRIGGERS), defenses=names("defenses", DEFENSES),
        sweep_attacks=names("sweep_attacks", TRIGGERS),
        **{key: _canonical_keys(getattr(profile, key), TRIGGERS, key)
           for key in ("attack_params", "poison_rates", "attack_prepare")},
        **{key: _canonical_keys(getattr(profile, key), DEFENSES, key) for key in ("defense_settings", "sweeps")})


def check_jobs(jobs, owner: str) -> None:
    """A benchmark's ``jobs``: how many models (poisoned ones, clean controls, cells) are trained at once."""
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ParError(f"{owner} must be a whole number >= 1 (models trained at once), got {jobs!r}")


@dataclass(frozen=True)
class Profile:
    """What the demo (one attack, one defense) and the benchmark (every attack x every defense) run.

    Paths in a profile (the stage files ``foundation``, ``poison_finetune``, ``pretrain``, ``clean`` and
    ``defense_settings`` entries, ``cache``, ``foundation_checkpoint``) are relative to the folder of the
    profile's own file, whatever the working directory; absolute paths stay as they are. Stage
    settings are held as mappings, read once. An empty key means its default. Change a profile in
    memory with ``dataclasses.replace`` and resolved values (mappings, absolute paths).
    """

    label: str = "banana"  # the backdoor's target class
    attack: str = "badnet_rs"  # the demo's attack and defense
    defense: str = "par"
    attacks: Optional[List[str]] = None  # the benchmark's; None: every registered one
    defenses: Optional[List[str]] = None
    attack_params: Dict[str, dict] = field(default_factory=dict)  # per attack
    world: dict = field(default_factory=dict)  # WorldConfig keys
    cache: Optional[Path] = None  # stages shared by every run (world, foundation); None: the run's folder
    foundation: Optional[dict] = None  # the clean foundation's training settings
    foundation_checkpoint: Optional[Path] = None  # a clean checkpoint used instead of training the foundation
    poisoning: Optional[str] = None  # finetune or scratch; None: finetune when there is a foundation
    poison_finetune: Optional[dict] = None
    pretrain: Optional[dict] = None  # poisoning: scratch
    poison: dict = field(default_factory=dict)  # PoisonConfig keys (rate, seed, num)
    poison_rates: Dict[str, float] = field(default_factory=dict)  # per attack, over poison's rate
    attack_prepare: Dict[str, dict] = field(default_factory=dict)  # what an attack builds first (BadCLIP's patch)
    clean: dict = field(default_factory=dict)  # the cleaning budget every defense shares
    defense_settings: Dict[str, dict] = field(default_factory=dict)  # per defense, on top of clean
    sweeps: Dict[str, dict] = field(default_factory=dict)  # per defense: {setting: [values]}
    sweep_attacks: Optional[List[str]] = None  # None: sweep on every attack
    synthetic_cleaning: Optional[SyntheticCleaning] = None
    reference: bool = True  # also evaluate the never-poisoned foundation
    seeds: List[int] = field(default_factory=lambda: [0])
    jobs: int = 1  # benchmark stages trained at once, each a process of one thread (their own models: one_thread)
    eval: Optional[dict] = None  # EvalConfig keys
    robust: Optional[Robust] = None
    scan: Optional[ScanBench] = None  # the scan table (scanners on poisoned and clean models)
    quick: Dict[str, Any] = field(default_factory=dict)  # --quick: these fields replaced (already read)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Profile":
        return cls.from_mapping(load_yaml(path), Path(path).resolve().parent)

    @classmethod
    def from_mapping(cls, values: dict, base: str | os.PathLike) -> "Profile":
        """A profile from YAML-like ``values``; relative paths resolve against the folder ``base``.

        ``extends: OTHER.yaml`` starts from another profile: each key given here replaces that key of
        the other whole (``null`` drops it), so a side benchmark shares the main one's regime."""
        values = {k: v for k, v in _extended(values, Path(base), ()).items() if v is not None}
        quick = values.pop("quick", None) or {}
        if not isinstance(quick, dict):
            raise ParError(f"profile key 'quick' must be a mapping of profile keys, got {quick!r}")
        known = sorted(f.name for f in dataclasses.fields(cls) if f.name != "quick")
        unknown = sorted(set(quick) - set(known))
        if unknown:
            raise ParError(f"unknown profile 'quick' key(s) {unknown}; known keys: {known}")
        profile = cls._read(values, Path(base))
        variant = cls._read({k: v for k, v in {**values, **quick}.items() if v is not None}, Path(base))
        return dataclasses.replace(profile, quick={k: getattr(variant, k) for k in quick})

    @classmethod
    def _read(cls, values: dict, base: Path) -> "Profile":
        plain = build(cls, {k: v for k, v in values.items() if k not in STAGES + PATHS + NESTED}, "profile")
        build(WorldConfig, plain.world, "profile 'world'")
        read: Dict[str, Any] = {key: _stage(values[key], key, base) for key in STAGES if key in values}
        if "cache" in values:
            read["cache"] = _path(values["cache"], "cache", base).resolve()
        if "foundation_checkpoint" in values:
            read["foundation_checkpoint"] = _path(values["foundation_checkpoint"], "foundation_checkpoint", base)
            if not read["foundation_checkpoint"].is_file():
                raise ParError(f"profile key 'foundation_checkpoint': no file {values['foundation_checkpoint']} "
                               f"(looked for {read['foundation_checkpoint']})")
        settings = values.get("defense_settings") or {}
        if not isinstance(settings, dict):
            raise ParError(f"profile key 'defense_settings' must map defenses to settings, got {settings!r}")
        read["defense_settings"] = {name: _stage(spec or {}, f"defense_settings.{name}", base)
                                    for name, spec in settings.items()}
        if values.get("synthetic_cleaning"):
            part = build(SyntheticCleaning, _mapping(values["synthetic_cleaning"], "synthetic_cleaning"),
                         "profile 'synthetic_cleaning'")
            build(WorldConfig, part.world, "profile 'synthetic_cleaning.world'")
            read["synthetic_cleaning"] = part
        if values.get("robust"):
            read["robust"] = build(Robust, _mapping(values["robust"], "robust"), "profile 'robust'")
            read["robust"].eval_settings()
        if values.get("scan"):
            read["scan"] = _canonical_scan(build(ScanBench, _mapping(values["scan"], "scan"), "profile 'scan'"))
        check_jobs(plain.jobs, "profile key 'jobs'")
        _check_settings(plain, read)
        profile = _canonical_names(dataclasses.replace(plain, **read))
        profile.poisoning_mode()
        return profile

    def poison_values(self, attack: str) -> dict:
        """The poisoning settings for ``attack``: ``poison`` with this attack's ``poison_rates`` entry on top."""
        values = {"rate": 0.05, "seed": 0, "num": None, **self.poison}
        if self.poison.get("num") is not None and "rate" not in self.poison:
            values["rate"] = None  # a count of pairs instead of the default share
        rate = self.poison_rates.get(attack)
        if rate is not None:
            values = {**values, "rate": rate, "num": None}
        return values

    def one_thread(self) -> "Profile":
        """The profile as ``jobs`` > 1 runs it: every stage trained beside another (a poisoning fine-tune, a
        clean control, a cell) takes one thread. The thread count changes the order of the arithmetic, so
        these are other models than the profile's own, kept in folders of their own (the foundation,
        trained alone before them, is the same)."""
        return dataclasses.replace(self, **{key: {**getattr(self, key), "threads": 1} for key in
                                            ("poison_finetune", "pretrain", "clean") if getattr(self, key)})

    def quick_profile(self) -> "Profile":
        """The ``--quick`` variant: minutes, not hours."""
        if not self.quick:  # else --quick would start the full run
            raise ParError("--quick: this profile has no 'quick' part (the keys its quick run replaces)")
        return dataclasses.replace(self, **self.quick)

    def poisoning_mode(self) -> str:
        """``finetune`` (the paper's regime: a short poisoned fine-tune of the clean foundation) or ``scratch``."""
        mode = self.poisoning or ("finetune" if self.foundation else "scratch")
        if mode not in ("finetune", "scratch"):
            raise ParError(f"profile 'poisoning' must be 'finetune' or 'scratch', got {mode!r}")
        if mode == "finetune" and not (self.foundation and self.poison_finetune):
            raise ParError("poisoning by fine-tuning needs the profile keys 'foundation' and 'poison_finetune'")
        if mode == "scratch" and not self.pretrain:
            raise ParError("poisoning from scratch needs the profile key 'pretrain'")
        return mode


def _extended(values: dict, base: Path, seen: tuple) -> dict:
    """``values`` over the profile it ``extends`` (recursively); the other file's paths made absolute."""
    if not isinstance(values, dict):
        raise ParError(f"a profile must be a mapping of keys to values, got {values!r}")
    if values.get("extends") is None:
        return {k: v for k, v in values.items() if k != "extends"}
    parent = _path(values["extends"], "extends", base).resolve()
    if parent in seen:
        raise ParError(f"profile key 'extends': {parent} extends itself (through {' -> '.join(map(str, seen))})")
    if not parent.is_file():
        raise ParError(f"profile key 'extends': no file {values['extends']} (looked for {parent})")
    inherited = _rebased(_extended(load_yaml(parent), parent.parent, seen + (parent,)), parent.parent)
    if isinstance(inherited.get("quick"), dict):  # its paths are the other file's too
        inherited["quick"] = _rebased(inherited["quick"], parent.parent)
        if "quick" not in values:  # a key this profile drops (null) stays dropped in the quick run it inherits
            dropped = {k for k, v in values.items() if v is None}
            inherited["quick"] = {k: v for k, v in inherited["quick"].items() if k not in dropped}
    return {**inherited, **{k: v for k, v in values.items() if k != "extends"}}


def _rebased(values: dict, folder: Path) -> dict:
    """``values`` with their relative paths (stage files, cache, checkpoint, defense settings) made absolute
    against ``folder``, the folder of the file they were read from."""
    values = dict(values)
    for key in STAGES + PATHS:
        if isinstance(values.get(key), (str, os.PathLike)):
            values[key] = str(_path(values[key], key, folder))
    if isinstance(values.get("defense_settings"), dict):
        values["defense_settings"] = {
            name: str(_path(spec, f"defense_settings.{name}", folder)) if isinstance(spec, (str, os.PathLike))
            else spec for name, spec in values["defense_settings"].items()}
    return values


def _mapping(value, key: str) -> dict:
    if not isinstance(value, dict):
        raise ParError(f"profile key {key!r} must be a mapping, got {value!r}")
    return value


def _path(value, key: str, base: Path) -> Path:
    if not isinstance(value, (str, os.PathLike)):
        raise ParError(f"profile key {key!r} must be a path, got {value!r}")
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


def _stage(spec, key: str, base: Path) -> dict:
    """A stage's settings: an inline mapping, or a YAML file (relative to the profile's folder)."""
    if isinstance(spec, dict):
        return dict(spec)
    if not isinstance(spec, (str, os.PathLike)):
        raise ParError(f"profile key {key!r} must be a mapping or a YAML file path, got {spec!r}")
    path = _path(spec, key, base)
    if not path.is_file():
        raise ParError(f"profile key {key!r}: no file {spec} (looked for {path})")
    return load_yaml(path)
