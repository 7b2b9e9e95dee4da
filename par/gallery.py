"""A picture of what every attack does to one image (like the paper's trigger figure)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

from par import attacks
from par.data import eval_transform, open_image
from par.errors import ParError
from par.utils import to_pil


def trigger_gallery(image_path: str | os.PathLike, out: str | os.PathLike, size: int = 224,
                    names: Optional[Sequence[str]] = None, seed: int = 0, params: Optional[dict] = None) -> Path:
    """Writes a row of ``size``-px tiles: the clean image, then each trigger applied to it, labelled.

    ``params`` maps ``"name.key"`` to a value for one trigger, e.g. ``{"badclip.patch": "patch.png"}``.
    """
    from PIL import Image, ImageDraw


    x = eval_transform(size)(open_image(Path(image_path)))[None].float() / 255
    tiles = [("clean", x)]
    per_trigger = {}
    for key, value in (params or {}).items():
        if "." not in key:
            raise ParError(f"gallery parameters are NAME.KEY=VALUE, got {key!r}")
        name, param = key.split(".", 1)
        per_trigger.setdefault(attacks.TRIGGERS.canonical(name), {})[param] = value
    for name in names or attacks.TRIGGERS.in_order():
        kwargs = per_trigger.get(name, {})
        try:
            tiles.append((attacks.get_trigger(name, **kwargs).paper_name, attacks.apply(name, x, seed=seed, **kwargs)))
        except ParError as e:  # e.g. badclip without a patch: show the gap, say why
            print(f"gallery: skipping {name}: {e}")
    label_h = 18
    grid = Image.new("RGB", (size * len(tiles), size + label_h), "white")
    draw = ImageDraw.Draw(grid)
    for i, (label, tile) in enumerate(tiles):
        grid.paste(to_pil(tile[0]), (i * size, label_h))
        draw.text((i * size + 4, 3), label, fill="black")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    return out
