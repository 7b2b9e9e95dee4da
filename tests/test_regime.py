"""The benchmark's regime: a clean foundation trained once, poisoning by fine-tuning it, RoCLIP, bad input."""
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from open_clip import ClipLoss

from conftest import REPO
from par import models
from par.app import pipeline
from par.app.profile import Profile
from par.config import load_yaml
from par.errors import ParError
from par.defenses.base import Batch, TaskContext, make_objective
from par.defenses.roclip import nearest_captions
from par.train import TrainConfig, train

MICRO = "par-micro-vit"


def _profile(**extra) -> Profile:
    """configs/micro.yaml with ``extra`` keys, read as YAML values (relative paths: configs/)."""
    return Profile.from_mapping({**load_yaml(f"{REPO}/configs/micro.yaml"), **extra}, f"{REPO}/configs")


def _distance(a: dict, b: dict) -> float:
    return sum((a[k].float() - b[k].float()).pow(2).sum().item() for k in a if a[k].is_floating_point()) ** 0.5


def test_the_foundation_is_trained_once_and_poisoning_fine_tunes_it(tmp_path, capsys):
    profile = _profile(cache=str(tmp_path / "cache"))
    world = pipeline.make_world_stage(profile, tmp_path / "a")
    assert world.path.parent == (tmp_path / "cache").resolve()  # the world lives in the shared cache too
    foundation, key = pipeline.foundation_stage(profile, tmp_path / "a", world)
    assert foundation.parent.parent == (tmp_path / "cache").resolve()
    stamp = foundation.stat().st_mtime_ns

    poisoned = {}
    for run, attack in (("a", "badnet_rs"), ("b", "blended")):  # two runs, two attacks, one foundation
        world = pipeline.make_world_stage(profile, tmp_path / run)
        poisoned[attack] = pipeline.poisoned_model_stage(profile, tmp_path / run, world, attack, "banana", {})
    assert foundation.stat().st_mtime_ns == stamp
    assert pipeline.foundation_stage(profile, tmp_path / "b", world) == (foundation, key)
    assert "reusing" in capsys.readouterr().out

    for attack, model in poisoned.items():
        config = load_yaml(model.checkpoint.parent / "config.yaml")
        assert Path(config["init_checkpoint"]) == foundation and config["train_data"] == str(model.data)
        assert config["preload"] is True  # the synthetic world's stages decode it once; the library default does not
        # starts from the foundation's weights: a few small steps away from it, far from any fresh model
        mine, start = models.load_checkpoint(model.checkpoint), models.load_checkpoint(foundation)
        fresh = models.create_model(MICRO).state_dict()
        assert _distance(mine, start) < 0.2 * _distance(mine, fresh)
        manifest = json.loads((model.data.parent / "manifest.json").read_text())
        assert manifest["settings"]["rate"] == 0.1 and manifest["settings"]["attack"] == attack


def test_preload_is_off_by_default():
    assert TrainConfig(model=MICRO, train_data="x.csv", out="o").preload is False


def test_poison_rates_per_attack_and_scratch_mode(tmp_path):
    profile = _profile(poison_rates={"badnet_rs": 0.25})
    assert profile.poison_values("badnet_rs")["rate"] == 0.25
    assert profile.poison_values("blended")["rate"] == 0.1
    scratch = _profile(poisoning="scratch", pretrain="micro/pretrain.yaml")
    world = pipeline.make_world_stage(scratch, tmp_path)
    model = pipeline.poisoned_model_stage(scratch, tmp_path, world, "badnet_rs", "banana", {})
    assert load_yaml(model.checkpoint.parent / "config.yaml")["init_checkpoint"] is None
    reference, _ = pipeline.foundation_stage(scratch, tmp_path, world)
    assert reference.parent.name.startswith("clean-model-")
    with pytest.raises(ParError, match="needs the profile key 'pretrain'"):
        _profile(poisoning="scratch")  # refused as the profile is read
    with pytest.raises(ParError, match="'finetune' or 'scratch'"):
        _profile(poisoning="later")
    with pytest.raises(ParError, match="needs the profile keys 'foundation' and 'poison_finetune'"):
        replace(_profile(), poison_finetune=None).poisoning_mode()  # and as a stage asks


def test_bad_input_is_refused_before_anything_is_written(tmp_path):
    profile = _profile()
    world = pipeline.make_world_stage(profile, tmp_path)
    # a rate that poisons no row of the 128 training pairs
    with pytest.raises(ParError, match="poisons no row"):
        pipeline.poisoned_model_stage(_profile(poison={"rate": 0.001, "seed": 0}), tmp_path, world, "badnet_rs",
                                      "banana", {})
    assert not list(tmp_path.glob("poison-*"))
    # a foundation checkpoint of another encoder
    other = models.save_checkpoint(models.create_model("par-tiny-vit"), tmp_path / "tiny.pt")
    stamp = other.stat().st_mtime_ns
    with pytest.raises(ParError, match="holds a par-tiny-vit model but the profile trains par-micro-vit"):
        pipeline.poisoned_model_stage(_profile(foundation_checkpoint=str(other)), tmp_path, world, "badnet_rs",
                                      "banana", {})
    assert other.stat().st_mtime_ns == stamp and not list(tmp_path.glob("poisoned-*"))
    # a cleaning budget of zero steps
    poisoned = pipeline.poisoned_model_stage(profile, tmp_path, world, "badnet_rs", "banana", {})
    settings = {**profile.clean, "steps": 0}
    with pytest.raises(ParError, match="steps must be at least 1"):
        pipeline.clean_stage(world, "par", poisoned, settings, tmp_path / "cleaned", reuse=False)
    assert not (tmp_path / "cleaned").exists()


def test_a_given_foundation_checkpoint_is_used_as_is(tmp_path):
    mine = models.save_checkpoint(models.create_model(MICRO), tmp_path / "mine.pt")
    profile = _profile(foundation_checkpoint=str(mine))
    world = pipeline.make_world_stage(profile, tmp_path)
    assert pipeline.foundation_stage(profile, tmp_path, world)[0] == mine
    model = pipeline.poisoned_model_stage(profile, tmp_path, world, "badnet_rs", "banana", {})
    assert Path(load_yaml(model.checkpoint.parent / "config.yaml")["init_checkpoint"]) == mine
    assert not list(tmp_path.glob("foundation-*"))


# RoCLIP --------------------------------------------------------------------------------------------


def test_nearest_captions_on_a_hand_made_pool():
    pool = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0], [0.6, 0.8, 0.0]])
    images = torch.nn.functional.normalize(torch.tensor([[0.9, 0.1, 0.0], [0.1, 0.2, 0.97], [0.5, 0.9, 0.0]]), dim=-1)
    # cosine similarity, not the dot product: pool row 1 is long but not the closest to image 2
    assert torch.equal(nearest_captions(images, pool), pool[[0, 2, 3]])


class _Features(torch.nn.Module):
    """Fixed image features; text features tell the captions apart by position."""

    def __init__(self):
        super().__init__()
        self.logit_scale = torch.nn.Parameter(torch.tensor(0.0))
        self.visual = torch.nn.Module()
        self.visual.image_size = 8

    def forward(self, images, tokens):
        n = images.shape[0]
        image = torch.nn.functional.normalize(torch.arange(1.0, 1.0 + 2 * n).view(n, 2), dim=-1)
        text = torch.nn.functional.normalize(tokens[:, :2].float() + 1, dim=-1)
        return image, text, torch.tensor(10.0)


def test_roclip_matches_only_on_its_schedule_and_fills_the_pool_after_looking():
    ctx = TaskContext(contrastive=ClipLoss(), seed=0)
    objective = make_objective("roclip", {"pool_size": 5, "match_every": 2, "augment": False}, _Features(), ctx)
    tokens = torch.tensor([[1, 0, 0], [0, 1, 0], [3, 3, 0]])
    batch = Batch(torch.zeros(3, 3, 8, 8), tokens, torch.zeros(3, 3, 8, 8, dtype=torch.uint8))
    model = _Features()
    objective.on_epoch_start(0)  # epoch 0 of every 2: the CLIP loss
    image, text, scale = model(batch.images, tokens)
    terms = objective(model, batch)
    assert terms["matched"] == 0 and terms["loss"] == pytest.approx(ClipLoss()(image, text, scale))
    assert torch.equal(objective.pool, text)
    objective(model, batch)
    assert objective.pool.shape[0] == 5  # FIFO, newest first
    objective.on_epoch_start(1)  # epoch 1: images against their nearest pool captions
    pool = objective.pool.clone()
    terms = objective(model, batch)
    expected = ClipLoss()(image, nearest_captions(image, pool), scale)
    assert terms["matched"] == 1 and terms["loss"] == pytest.approx(expected)
    state = objective.state_dict()
    again = make_objective("roclip", {"pool_size": 5, "augment": False}, _Features(), ctx)
    again.load_state_dict(state)
    assert torch.equal(again.pool, objective.pool) and again.matching


def test_roclip_cleans_through_the_loop_with_its_augmentations(micro_world, tmp_path):
    poisoned = models.save_checkpoint(models.create_model(MICRO), tmp_path / "poisoned.pt")
    cfg = TrainConfig(model=MICRO, train_data=str(micro_world / "clean.csv"), out=str(tmp_path / "run"),
                      init_checkpoint=str(poisoned), objective="roclip", objective_params={"match_every": 2},
                      steps=4, batch_size=16, warmup=1, threads=1, progress=False, log_every=1)  # 48 rows: 3 per epoch
    train(cfg)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["matched"] for r in records] == [0.0, 0.0, 0.0, 1.0]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
