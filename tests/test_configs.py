"""Every shipped YAML config builds into the dataclass it is for (no stale or misspelled keys)."""
from pathlib import Path

import pytest

from conftest import REPO
from par.config import build, load_yaml
from par.train import TrainConfig, validate

TRAIN_CONFIGS = sorted(str(p.relative_to(REPO)) for p in Path(REPO, "configs").rglob("*.yaml")
                       if p.name not in ("demo.yaml", "micro.yaml"))


@pytest.mark.parametrize("path", TRAIN_CONFIGS)
def test_train_configs_are_valid(path, tmp_path):
    values = {"model": "par-micro-vit", "train_csv": "x.csv", "out": "o", "init_checkpoint": "x.pt", **load_yaml(Path(REPO, path))}
    cfg = build(TrainConfig, values, path)
    validate(cfg)


@pytest.mark.parametrize("profile", ["configs/demo.yaml", "configs/micro.yaml"])
def test_demo_profiles_name_valid_stages(profile):
    from par.synthetic import WorldConfig

    data = load_yaml(Path(REPO, profile))
    build(WorldConfig, data["world"], "world")
    for stage in ("pretrain", "clean"):
        values = load_yaml(Path(REPO, data[stage]))
        values.setdefault("model", "par-micro-vit")
        validate(build(TrainConfig, {"train_csv": "x.csv", "out": "o", "init_checkpoint": "x.pt", **values}, stage))
