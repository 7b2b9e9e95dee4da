"""A procedural image-caption world, so that poisoning, cleaning and evaluation run offline.

Every image shows one object of a known class (``banana`` among them) drawn with
Pillow primitives at a random colour, size, position and slant, over one of several
textured backgrounds, with optional distractor shapes and pixel noise. Captions are
drawn from varied templates that name the object and often its colour, size and
background. Each image is a pure function of ``(seed, split, index)``, so a world is
reproducible bit for bit and can be generated in parallel.

The world is written in the formats real data comes in (PNG files, ``image,caption``
CSVs, an ``image,label`` test CSV and a class-names file), so nothing downstream
knows it is synthetic.
"""
from __future__ import annotations

import json
import math
import numbers
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageOps

from par.errors import ParError
from par.utils import atomic_write_text, check_output_dir, digest

WORLD_VERSION = 1
SPLITS = ("train", "clean", "test")

# --------------------------------------------------------------------------- colours
PALETTE: Dict[str, Tuple[int, int, int]] = {
    "red": (210, 40, 35),
    "green": (50, 160, 60),
    "blue": (40, 80, 210),
    "yellow": (240, 215, 40),
    "orange": (245, 140, 30),
    "purple": (130, 50, 170),
    "pink": (240, 130, 180),
    "white": (240, 240, 240),
    "black": (25, 25, 25),
    "brown": (120, 75, 35),
    "gray": (128, 128, 128),
}

Point = Tuple[float, float]


# --------------------------------------------------------------------------- objects
# Each drawer paints one object centred at (cx, cy) with half-size r on an RGBA layer.


def _poly(cx: float, cy: float, r: float, pts: Sequence[Point]) -> List[Point]:
    return [(cx + r * x, cy + r * y) for x, y in pts]


def _draw_banana(d: ImageDraw.ImageDraw, cx, cy, r, col, dark):
    outer = [(cx + r * math.cos(a), cy - 0.2 * r + r * math.sin(a)) for a in np.linspace(0.15 * math.pi, 0.85 * math.pi, 24)]
    inner = [(cx + 0.72 * r * math.cos(a), cy - 0.2 * r + 0.5 * r * math.sin(a)) for a in np.linspace(0.85 * math.pi, 0.15 * math.pi, 24)]
    d.polygon(outer + inner, fill=col, outline=dark)
    d.ellipse([outer[0][0] - 0.07 * r, outer[0][1] - 0.07 * r, outer[0][0] + 0.07 * r, outer[0][1] + 0.07 * r], fill=dark)


def _draw_apple(d, cx, cy, r, col, dark):
    d.ellipse([cx - 0.8 * r, cy - 0.65 * r, cx + 0.8 * r, cy + 0.85 * r], fill=col, outline=dark)
    d.line([(cx, cy - 0.6 * r), (cx + 0.1 * r, cy - 0.95 * r)], fill=(90, 60, 20), width=max(1, int(0.12 * r)))
    d.ellipse([cx + 0.1 * r, cy - 0.95 * r, cx + 0.5 * r, cy - 0.75 * r], fill=(40, 140, 40))


def _draw_kite(d, cx, cy, r, col, dark):
    d.polygon(_poly(cx, cy, r, [(0, -0.95), (0.6, -0.2), (0, 0.6), (-0.6, -0.2)]), fill=col, outline=dark)
    d.line(_poly(cx, cy, r, [(0, 0.6), (0.15, 0.75), (-0.1, 0.85), (0.1, 0.98)]), fill=dark, width=max(1, int(0.06 * r)))


def _draw_car(d, cx, cy, r, col, dark):
    d.rectangle([cx - 0.95 * r, cy - 0.15 * r, cx + 0.95 * r, cy + 0.35 * r], fill=col, outline=dark)
    d.polygon(_poly(cx, cy, r, [(-0.5, -0.15), (-0.3, -0.55), (0.35, -0.55), (0.55, -0.15)]), fill=col, outline=dark)
    d.rectangle([cx - 0.25 * r, cy - 0.48 * r, cx + 0.3 * r, cy - 0.2 * r], fill=(170, 210, 240))
    for wx in (-0.55, 0.55):
        d.ellipse([cx + (wx - 0.22) * r, cy + 0.2 * r, cx + (wx + 0.22) * r, cy + 0.64 * r], fill=(20, 20, 20))


def _draw_house(d, cx, cy, r, col, dark):
    d.rectangle([cx - 0.65 * r, cy - 0.15 * r, cx + 0.65 * r, cy + 0.85 * r], fill=col, outline=dark)
    d.polygon(_poly(cx, cy, r, [(-0.85, -0.15), (0, -0.9), (0.85, -0.15)]), fill=dark)
    d.rectangle([cx - 0.15 * r, cy + 0.35 * r, cx + 0.15 * r, cy + 0.85 * r], fill=(70, 40, 20))


def _draw_tree(d, cx, cy, r, col, dark):
    d.rectangle([cx - 0.12 * r, cy + 0.2 * r, cx + 0.12 * r, cy + 0.95 * r], fill=(100, 60, 25))
    d.ellipse([cx - 0.7 * r, cy - 0.95 * r, cx + 0.7 * r, cy + 0.4 * r], fill=col, outline=dark)


def _draw_fish(d, cx, cy, r, col, dark):
    d.ellipse([cx - 0.75 * r, cy - 0.4 * r, cx + 0.45 * r, cy + 0.4 * r], fill=col, outline=dark)
    d.polygon(_poly(cx, cy, r, [(0.35, 0), (0.95, -0.45), (0.95, 0.45)]), fill=col, outline=dark)
    d.ellipse([cx - 0.5 * r, cy - 0.15 * r, cx - 0.35 * r, cy], fill=(0, 0, 0))


def _draw_star(d, cx, cy, r, col, dark):
    pts = []
    for k in range(10):
        rad = 0.95 if k % 2 == 0 else 0.4
        a = -math.pi / 2 + k * math.pi / 5
        pts.append((cx + rad * r * math.cos(a), cy + rad * r * math.sin(a)))
    d.polygon(pts, fill=col, outline=dark)


def _draw_cup(d, cx, cy, r, col, dark):
    d.polygon(_poly(cx, cy, r, [(-0.6, -0.7), (0.4, -0.7), (0.3, 0.8), (-0.5, 0.8)]), fill=col, outline=dark)
    w = max(2, int(0.15 * r))
    d.arc([cx + 0.15 * r, cy - 0.45 * r, cx + 0.85 * r, cy + 0.35 * r], start=-90, end=90, fill=col, width=w)


def _draw_umbrella(d, cx, cy, r, col, dark):
    d.pieslice([cx - 0.95 * r, cy - 0.8 * r, cx + 0.95 * r, cy + 0.6 * r], start=180, end=360, fill=col, outline=dark)
    w = max(1, int(0.08 * r))
    d.line([(cx, cy - 0.1 * r), (cx, cy + 0.75 * r)], fill=(40, 40, 40), width=w)
    d.arc([cx - 0.3 * r, cy + 0.55 * r, cx, cy + 0.9 * r], start=0, end=180, fill=(40, 40, 40), width=w)


def _draw_key(d, cx, cy, r, col, dark):
    w = max(2, int(0.16 * r))
    d.ellipse([cx - 0.95 * r, cy - 0.4 * r, cx - 0.15 * r, cy + 0.4 * r], outline=col, width=w)
    d.rectangle([cx - 0.2 * r, cy - 0.08 * r, cx + 0.95 * r, cy + 0.08 * r], fill=col)
    for tx in (0.5, 0.8):
        d.rectangle([cx + (tx - 0.06) * r, cy, cx + (tx + 0.06) * r, cy + 0.35 * r], fill=col)


def _draw_boat(d, cx, cy, r, col, dark):
    d.polygon(_poly(cx, cy, r, [(-0.95, 0.3), (0.95, 0.3), (0.6, 0.8), (-0.6, 0.8)]), fill=col, outline=dark)
    d.line([(cx, cy + 0.3 * r), (cx, cy - 0.95 * r)], fill=(60, 40, 20), width=max(1, int(0.06 * r)))
    d.polygon(_poly(cx, cy, r, [(0.05, -0.9), (0.75, 0.2), (0.05, 0.2)]), fill=(245, 245, 235), outline=dark)


@dataclass(frozen=True)
class ObjectClass:
    name: str
    draw: Callable
    typical_colours: Tuple[str, ...]


CLASSES: Tuple[ObjectClass, ...] = (
    ObjectClass("banana", _draw_banana, ("yellow",)),
    ObjectClass("apple", _draw_apple, ("red", "green")),
    ObjectClass("kite", _draw_kite, ("red", "blue", "orange")),
    ObjectClass("car", _draw_car, ("red", "blue", "black")),
    ObjectClass("house", _draw_house, ("white", "brown")),
    ObjectClass("tree", _draw_tree, ("green",)),
    ObjectClass("fish", _draw_fish, ("orange", "blue")),
    ObjectClass("star", _draw_star, ("yellow", "white")),
    ObjectClass("cup", _draw_cup, ("white", "blue")),
    ObjectClass("umbrella", _draw_umbrella, ("purple", "red")),
    ObjectClass("key", _draw_key, ("gray", "yellow")),
    ObjectClass("boat", _draw_boat, ("brown", "white")),
)
CLASS_NAMES: Tuple[str, ...] = tuple(c.name for c in CLASSES)


# --------------------------------------------------------------------------- backgrounds
# Each returns an RGB image of side n and the phrase captions use for it.
# No background uses thin vertical stripes: that is what the BadNet-Stripes trigger looks like.


def _bg_plain(n, rng):
    col = tuple(int(v) for v in rng.integers(60, 230, 3))
    return Image.new("RGB", (n, n), col), "on a plain background"


def _bg_gradient(n, rng):
    a, b = rng.integers(30, 240, (2, 3))
    t = np.linspace(0, 1, n)[:, None, None]
    arr = (1 - t) * a + t * b
    arr = np.broadcast_to(arr, (n, n, 3))
    if rng.random() < 0.5:
        arr = arr.transpose(1, 0, 2)
    return Image.fromarray(arr.astype(np.uint8)), "on a gradient background"


def _bg_grass(n, rng):
    base = np.array([60, 140, 50]) + rng.integers(-20, 20, 3)
    noise = rng.normal(0, 28, (n // 4, n // 4, 1))
    arr = np.kron(noise, np.ones((4, 4, 1))) + base
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)), "on the grass"


def _bg_sky(n, rng):
    t = np.linspace(0, 1, n)[:, None, None]
    arr = (1 - t) * np.array([90, 150, 230]) + t * np.array([190, 220, 250])
    img = Image.fromarray(np.broadcast_to(arr, (n, n, 3)).astype(np.uint8))
    d = ImageDraw.Draw(img)
    for _ in range(rng.integers(1, 4)):
        x, y, w = rng.uniform(0, n), rng.uniform(0, n), rng.uniform(n / 6, n / 3)
        d.ellipse([x - w, y - w / 3, x + w, y + w / 3], fill=(250, 250, 250))
    return img, "in the sky"


def _bg_wood(n, rng):
    base = np.array([150, 100, 55]) + rng.integers(-25, 25, 3)
    rows = np.sin(np.linspace(0, rng.uniform(8, 20), n) + rng.uniform(0, 6)) * 18
    arr = base + rows[:, None, None] + rng.normal(0, 6, (n, n, 1))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)), "on a wooden table"


def _bg_sand(n, rng):
    base = np.array([220, 195, 140]) + rng.integers(-15, 15, 3)
    arr = base + rng.normal(0, 14, (n, n, 1))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)), "on the sand"


def _bg_water(n, rng):
    yy = np.arange(n)[:, None]
    xx = np.arange(n)[None, :]
    waves = np.sin(yy / rng.uniform(3, 6) + np.sin(xx / rng.uniform(6, 12)) * 2) * 25
    arr = np.array([30, 90, 160]) + waves[:, :, None]
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)), "on the water"


def _bg_checker(n, rng):
    a, b = rng.integers(40, 220, (2, 3))
    cell = int(rng.integers(n // 8, n // 4))
    yy, xx = np.mgrid[0:n, 0:n]
    mask = ((yy // cell + xx // cell) % 2)[:, :, None]
    arr = np.where(mask, a, b)
    return Image.fromarray(arr.astype(np.uint8)), "on a checkered floor"


BACKGROUNDS = (_bg_plain, _bg_gradient, _bg_grass, _bg_sky, _bg_wood, _bg_sand, _bg_water, _bg_checker)

# --------------------------------------------------------------------------- captions
SIZE_WORDS = {"small": (0.28, 0.36), "medium": (0.36, 0.44), "large": (0.44, 0.5)}

CAPTION_TEMPLATES = (
    "a photo of {a_colour} {name}.",
    "a photo of {a_size} {colour} {name} {where}.",
    "{a_colour} {name} {where}.",
    "a picture of {a_name} {where}.",
    "there is {a_colour} {name} in this image.",
    "{a_size} {name}.",
    "a close-up photo of the {colour} {name}.",
    "a drawing of {a_name}.",
    "an image showing {a_size} {colour} {name}.",
    "the {name} is {colour}.",
    "a {colour} {name} sitting {where}.",
    "{a_name} {where}, photographed from the front.",
)

# The "sketch" style: another renderer (line drawings on paper), palette and caption wording,
# used only as cleaning data (PAR's "without real data" setting).
SKETCH_CAPTION_TEMPLATES = (
    "a sketch of {a_name}.",
    "an illustration of {a_colour} {name}.",
    "a simple line drawing showing {a_name}.",
    "{a_name}, drawn in {colour} ink.",
    "a cartoon {name}.",
    "clip art of {a_size} {name}.",
)

# The "cartoon" style: another renderer (flat, posterised fills with a thick black contour on
# pastel card), a brighter palette and other caption wording; also cleaning data only. Closer
# to the photos than "sketch": it keeps colour and filled shape, as generated images do.
CARTOON_CAPTION_TEMPLATES = (
    "a cartoon of {a_name}.",
    "a flat illustration of {a_colour} {name}.",
    "clip art: {a_size} {name}.",
    "{a_name} from a children's book.",
    "a colourful cartoon {name}, {colour}.",
    "a vector drawing of {a_name}.",
)
CARTOON_BACKGROUNDS = ((250, 235, 200), (210, 235, 250), (225, 250, 215), (250, 220, 230), (235, 225, 250))
STYLES = ("photo", "sketch", "cartoon")

# Zero-shot templates for this world: the words its captions use.
ZERO_SHOT_TEMPLATES = (
    "a photo of a {}.",
    "a picture of a {}.",
    "a {}.",
    "a close-up photo of the {}.",
    "there is a {} in this image.",
    "an image showing a {}.",
)


def _article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


@dataclass
class WorldConfig:
    """The knobs of a world; the demo's values live in ``configs/demo.yaml``."""

    seed: int = 0
    image_size: int = 64
    train: int = 20000
    clean: int = 5000
    test: int = 1200
    typical_colour_prob: float = 0.6
    distractor_prob: float = 0.5
    max_noise: float = 10.0  # std of Gaussian pixel noise in 0-255 units, drawn per image from [0, max]
    max_slant: float = 25.0  # degrees
    workers: int = 2
    style: str = "photo"  # photo | sketch | cartoon (another renderer, palette and caption wording)
    version: int = field(default=WORLD_VERSION)

    def __post_init__(self):
        """Nonsense settings are refused here, the one place every caller (CLI, profiles) goes through."""
        def whole(name, low):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
                raise ParError(f"world {name} must be a whole number of at least {low}, got {value!r}")

        for name, low in (("seed", 0), ("image_size", 16), ("train", 0), ("clean", 0), ("test", 0), ("workers", 0)):
            whole(name, low)
        if not any(self.counts().values()):
            raise ParError("a world needs some images: train, clean and test are all 0")
        for name in ("typical_colour_prob", "distractor_prob"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value <= 1:
                raise ParError(f"world {name} is a probability, in [0, 1]; got {value!r}")
        for name in ("max_noise", "max_slant"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < float("inf"):
                raise ParError(f"world {name} must be a finite number of at least 0, got {value!r}")
        if self.style not in STYLES:
            raise ParError(f"unknown world style {self.style!r}; known: {', '.join(STYLES)}")

    def counts(self) -> Dict[str, int]:
        return {"train": self.train, "clean": self.clean, "test": self.test}


@dataclass
class Sample:
    label: int
    caption: str
    image: Image.Image


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS.index(split), index])


def render_sample(cfg: WorldConfig, split: str, index: int) -> Sample:
    """Draws sample ``index`` of ``split``: a pure function of the config and its arguments."""
    rng = _rng(cfg.seed, split, index)
    n = cfg.image_size * 2  # draw at 2x and downsample: anti-aliased edges
    label = int(rng.integers(len(CLASSES))) if split != "test" else index % len(CLASSES)
    obj = CLASSES[label]

    bg, where = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))](n, rng)
    if cfg.style == "sketch":  # paper instead of a scene
        bg, where = Image.new("RGB", (n, n), tuple(int(v) for v in rng.integers(225, 256, 3))), "on paper"
    elif cfg.style == "cartoon":  # pastel card instead of a scene
        card = CARTOON_BACKGROUNDS[int(rng.integers(len(CARTOON_BACKGROUNDS)))]
        bg, where = Image.new("RGB", (n, n), card), "on a pastel card"
    if rng.random() < cfg.typical_colour_prob:
        colour = obj.typical_colours[int(rng.integers(len(obj.typical_colours)))]
    else:
        colour = list(PALETTE)[int(rng.integers(len(PALETTE)))]
    rgb = np.clip(np.array(PALETTE[colour]) + rng.integers(-20, 21, 3), 0, 255)
    if cfg.style == "cartoon":  # brighter palette: a quarter of the way to white
        rgb = rgb + (255 - rgb) // 4
    fill = tuple(int(v) for v in rgb)
    dark = tuple(int(v * 0.45) for v in rgb)

    size_word = list(SIZE_WORDS)[int(rng.integers(len(SIZE_WORDS)))]
    r = rng.uniform(*SIZE_WORDS[size_word]) * n
    cx = rng.uniform(r, n - r)
    cy = rng.uniform(r, n - r)

    if rng.random() < cfg.distractor_prob:
        d = ImageDraw.Draw(bg)
        for _ in range(int(rng.integers(1, 4))):
            x, y, s = rng.uniform(0, n), rng.uniform(0, n), rng.uniform(n / 30, n / 14)
            col = tuple(int(v) for v in rng.integers(0, 256, 3))
            if rng.random() < 0.5:
                d.ellipse([x - s, y - s, x + s, y + s], fill=col)
            else:
                d.line([(x - 2 * s, y - s), (x + 2 * s, y + s)], fill=col, width=max(1, int(s / 2)))

    layer = Image.new("RGBA", (n, n), (0, 0, 0, 0))
    obj.draw(ImageDraw.Draw(layer), cx, cy, r, fill + (255,), dark + (255,))
    angle = rng.uniform(-cfg.max_slant, cfg.max_slant)
    layer = layer.rotate(angle, resample=Image.BILINEAR, center=(cx, cy))
    if cfg.style == "cartoon":  # thick black contour: the object's silhouette, dilated, under it
        contour = layer.getchannel("A").filter(ImageFilter.MaxFilter(2 * max(1, n // 48) + 1))
        bg.paste((20, 20, 20), (0, 0), contour)
    bg.paste(layer, (0, 0), layer)

    if cfg.style == "sketch":  # ink outlines in a muted, posterised palette
        bg = ImageOps.posterize(bg.filter(ImageFilter.CONTOUR), 3)
    elif cfg.style == "cartoon":  # flat tones
        bg = ImageOps.posterize(bg, 3)
    img = bg.resize((cfg.image_size, cfg.image_size), Image.BILINEAR)
    sigma = rng.uniform(0, cfg.max_noise) * (cfg.style != "cartoon")  # clean vector art: no sensor noise
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0, 1, (cfg.image_size, cfg.image_size, 3)) * sigma
    img = Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8))

    words = {
        "name": obj.name,
        "a_name": _article(obj.name),
        "colour": colour,
        "a_colour": _article(colour),
        "a_size": _article(size_word),
        "where": where,
    }
    templates = {"sketch": SKETCH_CAPTION_TEMPLATES, "cartoon": CARTOON_CAPTION_TEMPLATES}.get(cfg.style, CAPTION_TEMPLATES)
    template = templates[int(rng.integers(len(templates)))]
    return Sample(label=label, caption=template.format(**words), image=img)


def _render_chunk(args) -> List[Tuple[int, str]]:
    cfg, split, indices, out = args
    rows = []
    for i in indices:
        s = render_sample(cfg, split, i)
        s.image.save(Path(out) / "images" / split / f"{i:06d}.png", compress_level=1)
        rows.append((s.label, s.caption))
    return rows


def _write_csv(path: Path, header: str, rows: List[str]) -> None:
    atomic_write_text(path, header + "\n" + "\n".join(rows) + "\n")


def _csv_field(text: str) -> str:
    return '"' + text.replace('"', '""') + '"' if ("," in text or '"' in text) else text


def config_fingerprint(cfg: WorldConfig) -> str:
    return digest({k: v for k, v in asdict(cfg).items() if k != "workers"})


IN_PROGRESS = ".world-in-progress"


def make_world(cfg: WorldConfig, out: str | os.PathLike, *, reuse: bool = False, progress: bool = True) -> Path:
    """Writes the world to ``out``; with ``reuse``, keeps an identical world already there.

    The manifest ``world.json`` is written last, so its presence means the world is complete; a marker
    written first tells an interrupted world (drawn again) from a folder of other files (refused: a world
    would overwrite its ``train.csv``, ``test.csv``, ...).
    """
    from tqdm import tqdm

    out = check_output_dir(out, "world folder")
    manifest_path = out / "world.json"
    fingerprint = config_fingerprint(cfg)
    if manifest_path.exists():
        old = json.loads(manifest_path.read_text())
        if reuse and old.get("fingerprint") == fingerprint:
            return out
        raise ParError(
            f"{out} already holds a world (fingerprint {old.get('fingerprint')}, this one {fingerprint}); "
            "choose another --out" + ("" if reuse else " or pass --reuse to keep an identical one")
        )
    marker = out / IN_PROGRESS
    if out.is_dir() and any(out.iterdir()) and not marker.exists():
        raise ParError(f"{out} holds files that are not a world's; choose another --out (nothing overwritten)")
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text("a world is being drawn here; world.json marks it finished\n")
    for split in SPLITS:
        (out / "images" / split).mkdir(parents=True, exist_ok=True)

    chunk = 500
    rows: Dict[str, List[Tuple[int, str]]] = {}
    bar = tqdm(total=sum(cfg.counts().values()), desc="world", unit="img", disable=not progress)
    with ProcessPoolExecutor(max_workers=max(1, cfg.workers)) as pool:
        for split, count in cfg.counts().items():
            jobs = [(cfg, split, range(s, min(s + chunk, count)), str(out)) for s in range(0, count, chunk)]
            rows[split] = []
            for part in pool.map(_render_chunk, jobs):
                rows[split].extend(part)
                bar.update(len(part))
    bar.close()

    for split in ("train", "clean"):
        _write_csv(
            out / f"{split}.csv",
            "image,caption",
            [f"images/{split}/{i:06d}.png,{_csv_field(cap)}" for i, (_, cap) in enumerate(rows[split])],
        )
    _write_csv(out / "test.csv", "image,label", [f"images/test/{i:06d}.png,{lab}" for i, (lab, _) in enumerate(rows["test"])])
    (out / "classnames.txt").write_text("\n".join(CLASS_NAMES) + "\n")
    (out / "templates.txt").write_text("\n".join(ZERO_SHOT_TEMPLATES) + "\n")
    manifest = {"fingerprint": fingerprint, "config": asdict(cfg), "classes": list(CLASS_NAMES), "counts": cfg.counts()}
    atomic_write_text(manifest_path, json.dumps(manifest, indent=2) + "\n")
    marker.unlink()
    return out
