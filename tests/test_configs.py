"""Every shipped YAML config builds into the dataclass it is for (no stale or misspelled keys)."""
from pathlib import Path

import pytest

from conftest import REPO
from par.config import load_yaml
from par.train import train_config, validate

ALL = sorted(Path(REPO, "configs").rglob("*.yaml"))
PROFILES = [p for p in ALL if {"world", "extends"} & set(load_yaml(p))]  # demo and benchmark profiles
TRAIN_CONFIGS = [p for p in ALL if p not in PROFILES]


def _check_train(values: dict, source: str) -> None:
    values = {"model": "par-micro-vit", "train_data": "x.csv", "out": "o", "init_checkpoint": "x.pt", **values}
    if values.get("eval_every"):  # a stage's learning curve: the pipeline fills in the world's test split
        values = {"eval_csv": "test.csv", "eval_classnames": "classnames.txt", **values}
    validate(train_config(values, source))


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_train_configs_are_valid(path):
    _check_train(load_yaml(path), str(path))


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: str(p.relative_to(REPO)))
def test_profiles_name_valid_stages(path):
    from par import attacks
    from par.app.bench import _defense_settings
    from par.app.pipeline import robust_settings
    from par.app.profile import Profile
    from par.config import merge
    from par.defenses import DEFENSES, CleaningJob, FineTune
    from par.defenses.invert import Invert

    full = Profile.load(path)  # every key known, every stage file found, the quick variant's keys too
    for profile in (full, full.quick_profile()) if full.quick else (full,):
        stages = [s for s in ("foundation", "poison_finetune", "pretrain", "clean") if getattr(profile, s)]
        assert "clean" in stages and ("pretrain" in stages or {"foundation", "poison_finetune"} <= set(stages))
        for stage in stages:
            _check_train(getattr(profile, stage), f"{path}:{stage}")
        for name in profile.poison_rates:
            attacks.get_trigger(name)
        job = CleaningJob(checkpoint="x.pt", model="par-micro-vit", train_data="x.csv", out="o")
        for name in set(profile.defenses or DEFENSES.names()) | set(profile.defense_settings):
            defense = DEFENSES.get(name)
            job.settings = _defense_settings(profile, name)
            defense.check(job)
            own = (profile.defense_settings.get(name) or {}).get("objective_params") or {}
            if isinstance(defense, FineTune):  # a defense's own objective settings are the ones it trains with
                trained = defense.config(job).objective_params
            elif isinstance(defense, Invert):
                trained = defense._finetune_settings(job, None)[1]["objective_params"]
            elif hasattr(defense, "_finetune_job"):  # eftclip: its last stage fine-tunes on the curated pairs
                trained = FineTune(defense.objective).config(defense._finetune_job(job, "x.csv")).objective_params
            else:
                assert not own, f"{path}: cannot tell what {name} trains with, so not whether {own} reach it"
                trained = own
            assert {k: trained.get(k) for k in own} == own, (path, name, trained)
            for key, values in (profile.sweeps.get(name) or {}).items():
                for value in values:
                    job.settings = merge(_defense_settings(profile, name), {key: value})
                    defense.check(job)
        robust_settings(profile.robust)
        for name, params in profile.attack_params.items():
            attacks.get_trigger(name, **params)
        for name in profile.attacks or []:
            attacks.get_trigger(name)
    assert len(PROFILES) == 14 and len(TRAIN_CONFIGS) >= 8
