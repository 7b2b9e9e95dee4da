import math
import random

import pytest
import torch
from open_clip import ClipLoss

from par.errors import ParError
from par.defenses.base import OBJECTIVES, Batch, TaskContext, make_objective
from par.text_augment import SYNONYMS, eda


class FixedFeatures(torch.nn.Module):
    """Returns one-hot features by position; the second half (augmented views) can be rolled."""

    def __init__(self, scale, roll_images=0):
        super().__init__()
        self.scale, self.roll_images = scale, roll_images
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(scale)))

    def forward(self, images, tokens):
        n = images.shape[0]
        half = n // 2 if n > 4 else n
        eye = torch.eye(half)
        image = eye if half == n else torch.cat([eye, eye.roll(self.roll_images, dims=0)])
        text = eye if half == n else torch.cat([eye, eye])
        return image, text, torch.tensor(self.scale)


def _batch(n=4):
    return Batch(images=torch.zeros(n, 3, 8, 8), tokens=torch.zeros(n, 5, dtype=torch.long),
                 raw_images=torch.zeros(n, 3, 8, 8, dtype=torch.uint8), captions=["a photo of a cup."] * n)


def test_clip_objective_hand_computed():
    n, s = 4, 2.0
    model = FixedFeatures(s)
    terms = make_objective("ft", {}, model, TaskContext(ClipLoss()))(model, _batch(n))
    assert terms["loss"].item() == pytest.approx(math.log(1 + (n - 1) * math.exp(-s)))


def test_cleanclip_objective_hand_computed():
    n, s, lam = 4, 2.0, 0.5
    tokenizer = lambda texts: torch.zeros(len(texts), 5, dtype=torch.long)  # noqa: E731
    model = FixedFeatures(s, roll_images=1)
    objective = make_objective("cleanclip", {"unimodal_weight": lam}, model, TaskContext(ClipLoss(), tokenizer))
    # augmented images embed one position off: their positive pair has similarity 0
    terms = objective(model, _batch(n))
    matched = math.log(1 + (n - 1) * math.exp(-s))
    shifted = math.log(math.exp(s) + n - 1)
    assert terms["clip_loss"].item() == pytest.approx(matched)
    assert terms["image_image_loss"].item() == pytest.approx(shifted)
    assert terms["text_text_loss"].item() == pytest.approx(matched)
    assert terms["loss"].item() == pytest.approx(matched + lam * 0.5 * (shifted + matched))


def test_unknown_objective_lists_known():
    with pytest.raises(ParError, match=f"unknown objective .nope.; known: {', '.join(OBJECTIVES.names())}$"):
        OBJECTIVES.get("nope")


def test_objectives_own_their_settings_frozen_copy_and_trainable_parameters():
    model = FixedFeatures(2.0)
    par = make_objective("par", {"tau": 1.5}, model, TaskContext(ClipLoss()))
    assert par.params.tau == 1.5 and not model.logit_scale.requires_grad  # PAR keeps the temperature fixed
    assert par.frozen is not model and not any(p.requires_grad for p in par.frozen.parameters())
    assert par.plot_guides() == {"distance_threshold": 1.5}
    clip = make_objective("clip", {}, model, TaskContext(ClipLoss()))
    assert clip.frozen is None and model.logit_scale.requires_grad  # pre-training learns it
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    clip.after_step(model)
    assert model.logit_scale.item() == pytest.approx(math.log(100))  # CLIP's cap
    with pytest.raises(ParError, match=r"objective_params of 'clip'.*\['tau'\]"):
        make_objective("clip", {"tau": 1.0}, model, TaskContext(ClipLoss()))
    with pytest.raises(ParError, match="tau.*must be float"):
        make_objective("par", {"tau": "high"}, model, TaskContext(ClipLoss()))


def test_cleanclip_random_state_round_trips():
    tokenizer = lambda texts: torch.zeros(len(texts), 5, dtype=torch.long)  # noqa: E731
    model = FixedFeatures(2.0)
    a = make_objective("cleanclip", {}, model, TaskContext(ClipLoss(), tokenizer, seed=3))
    a.rng.random()
    state = a.state_dict()
    expected = [a.rng.random() for _ in range(3)]
    b = make_objective("cleanclip", {}, model, TaskContext(ClipLoss(), tokenizer, seed=99))
    b.load_state_dict({"eda_rng": [list(x) if isinstance(x, tuple) else x for x in state["eda_rng"]]})
    assert [b.rng.random() for _ in range(3)] == expected


def test_eda_operations():
    caption = "a photo of a small red car on the grass."
    outputs = {eda(caption, random.Random(seed), alpha=0.2) for seed in range(40)}
    assert len(outputs) > 5 and all(outputs)
    words = caption.split()
    for out in outputs:
        new = out.split()
        swapped = sorted(new) == sorted(words)
        deleted = len(new) < len(words) and all(w in words for w in new)
        inserted = len(new) > len(words)
        replaced = len(new) == len(words) and any(
            a != b and a.strip(".") in SYNONYMS and b.strip(".") in SYNONYMS[a.strip(".")] for a, b in zip(words, new))
        assert swapped or deleted or inserted or replaced or out == caption, out
    assert eda(caption, random.Random(3)) == eda(caption, random.Random(3))
    assert eda("banana", random.Random(0)) == "banana"


def test_ft_is_plain_and_ft_aug_adds_pars_augmentation(capsys):
    from par.defenses import DEFENSES, CleaningJob

    job = CleaningJob(checkpoint="poisoned.pt", model="par-micro-vit", train_data="clean.csv", out="runs/x",
                      settings={"augment": "par", "steps": 5, "objective": "par", "objective_params": {"tau": 1.0}})
    ft, ft_aug = DEFENSES.get("ft").config(job), DEFENSES.get("ft-aug").config(job)
    assert (ft.objective, ft.augment, ft.steps) == ("clip", "none", 5)  # the shared budget, not its augmentation
    assert (ft_aug.objective, ft_aug.augment, ft_aug.steps) == ("clip", "par", 5)
    # PAR's settings are not the CLIP loss's; cleaning keeps the temperature fixed, which clip would learn
    assert ft.objective_params == {"train_logit_scale": False} == ft_aug.objective_params
    job.settings = {"objective": "clip", "objective_params": {"train_logit_scale": True}}  # unless told to learn it
    assert DEFENSES.get("ft").config(job).objective_params == {"train_logit_scale": True}
    assert DEFENSES.get("par").config(job).objective_params == {}  # par's own default: fixed
