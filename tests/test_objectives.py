import math
import random
from types import SimpleNamespace

import pytest
import torch
from open_clip import ClipLoss

from par.objectives import OBJECTIVES, Batch
from par.text_augment import SYNONYMS, eda


class FixedFeatures(torch.nn.Module):
    """Returns one-hot features by position; the second half (augmented views) can be rolled."""

    def __init__(self, scale, roll_images=0):
        super().__init__()
        self.scale, self.roll_images = scale, roll_images

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
    terms = OBJECTIVES.get("ft")(SimpleNamespace(), ClipLoss())(FixedFeatures(s), _batch(n))
    assert terms["loss"].item() == pytest.approx(math.log(1 + (n - 1) * math.exp(-s)))


def test_cleanclip_objective_hand_computed():
    n, s, lam = 4, 2.0, 0.5
    cfg = SimpleNamespace(cleanclip_lambda=lam)
    tokenizer = lambda texts: torch.zeros(len(texts), 5, dtype=torch.long)  # noqa: E731
    objective = OBJECTIVES.get("cleanclip")(cfg, ClipLoss(), tokenizer=tokenizer, mean=(0, 0, 0), std=(1, 1, 1))
    # augmented images embed one position off: their positive pair has similarity 0
    terms = objective(FixedFeatures(s, roll_images=1), _batch(n))
    matched = math.log(1 + (n - 1) * math.exp(-s))
    shifted = math.log(math.exp(s) + n - 1)
    assert terms["clip_loss"].item() == pytest.approx(matched)
    assert terms["image_image_loss"].item() == pytest.approx(shifted)
    assert terms["text_text_loss"].item() == pytest.approx(matched)
    assert terms["loss"].item() == pytest.approx(matched + lam * 0.5 * (shifted + matched))


def test_unknown_objective_lists_known():
    from par.errors import ParError

    with pytest.raises(ParError, match="cleanclip.*clip.*par"):
        OBJECTIVES.get("roclip")


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
