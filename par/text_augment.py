"""EDA caption augmentation (Wei & Zou, 2019), as CleanCLIP uses it.

Four operations, one chosen per caption: synonym replacement, random insertion (of a
synonym of a word already in the caption), random swap and random deletion. WordNet is
not available offline, so synonyms come from a small built-in table covering common
caption words and the synthetic world's vocabulary; words without synonyms are left
alone by replacement and insertion (swap and deletion still apply).
"""
from __future__ import annotations

import random
from typing import Dict, List, Sequence

SYNONYMS: Dict[str, Sequence[str]] = {
    "photo": ("picture", "image", "snapshot"), "picture": ("photo", "image"), "image": ("picture", "photo"),
    "small": ("little", "tiny"), "large": ("big", "huge"), "big": ("large",), "little": ("small",),
    "medium": ("mid-sized", "average"), "drawing": ("sketch", "illustration"), "close-up": ("detailed",),
    "showing": ("depicting", "displaying"), "sitting": ("resting", "lying"), "photographed": ("captured", "shot"),
    "front": ("face",), "there": ("here",), "table": ("desk",), "floor": ("ground",), "sky": ("air", "heavens"),
    "water": ("sea", "lake"), "sand": ("beach",), "grass": ("lawn", "meadow"), "background": ("backdrop", "setting"),
    "wooden": ("timber", "wood"), "plain": ("simple", "bare"), "checkered": ("chequered", "checked"),
    "gradient": ("fading",), "car": ("automobile", "vehicle"), "house": ("home", "building"), "boat": ("ship", "vessel"),
    "cup": ("mug",), "fish": ("trout",), "star": ("asterisk",), "kite": ("glider",), "key": ("latch key",),
    "gray": ("grey",), "red": ("crimson",), "blue": ("azure",), "green": ("verdant",), "yellow": ("golden",),
    "purple": ("violet",), "pink": ("rosy",), "white": ("snowy",), "black": ("dark",), "brown": ("tan",),
    "orange": ("amber",), "man": ("person", "guy"), "woman": ("lady", "person"), "people": ("persons", "folks"),
    "dog": ("puppy", "hound"), "cat": ("kitten",), "street": ("road",), "city": ("town",), "beautiful": ("pretty",),
}


def eda(caption: str, rng: random.Random, alpha: float = 0.1) -> str:
    """One EDA operation on ``caption``, changing about ``alpha`` of its words (at least one)."""
    words = caption.split()
    if len(words) < 2:
        return caption
    n = max(1, int(alpha * len(words)))
    op = rng.choice(("synonym", "insert", "swap", "delete"))
    if op == "synonym":
        candidates = [i for i, w in enumerate(words) if w.strip(".,").lower() in SYNONYMS]
        for i in rng.sample(candidates, min(n, len(candidates))):
            core = words[i].strip(".,")
            words[i] = words[i].replace(core, rng.choice(SYNONYMS[core.lower()]))
    elif op == "insert":
        candidates = [w.strip(".,").lower() for w in words if w.strip(".,").lower() in SYNONYMS]
        for _ in range(n if candidates else 0):
            words.insert(rng.randrange(len(words) + 1), rng.choice(SYNONYMS[rng.choice(candidates)]))
    elif op == "swap":
        for _ in range(n):
            i, j = rng.randrange(len(words)), rng.randrange(len(words))
            words[i], words[j] = words[j], words[i]
    else:
        kept = [w for w in words if rng.random() > alpha]
        words = kept or [rng.choice(words)]
    return " ".join(words)


def eda_batch(captions: List[str], rng: random.Random, alpha: float = 0.1) -> List[str]:
    return [eda(c, rng, alpha) for c in captions]
