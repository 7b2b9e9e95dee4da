"""A picture of what every attack does to one image (like the paper's trigger figure)."""
from __future__ import annotations

import numbers
import os
from pathlib import Path
from typing import Optional, Sequence

from par import attacks
from par.data import eval_transform, open_image
from par.errors import ParError
from par.utils import atomic_write, check_output_file, to_pil


def trigger_gallery(image_path: str | os.PathLike, out: str | os.PathLike, size: int = 224,
                    names: Optional[Sequence[str]] = None, seed: int = 0, params: Optional[dict] = None) -> Path:
    """Writes a row of ``size``-px tiles: the clean image, then each trigger applied to it, labelled.

    ``params`` maps ``"name.key"`` to a value for one trigger, e.g. ``{"badclip.patch": "patch.png"}``.
    """
    from PIL import Image, ImageDraw

    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
        raise ParError(f"gallery tile size must be a whole number of pixels, at least 1; got {size!r}")
    out = check_output_file(out, "gallery image")
    if out.suffix.lower() not in Image.registered_extensions():
        raise ParError(f"gallery image {out} needs an image file extension (.png, .jpg, ...)")
    per_trigger = {}
    for key, value in (params or {}).items():
        if "." not in key:
            raise ParError(f"gallery parameters are NAME.KEY=VALUE, got {key!r}")
        name, param = key.split(".", 1)
        per_trigger.setdefault(attacks.TRIGGERS.canonical(name), {})[param] = value
    chosen = [attacks.TRIGGERS.canonical(n) for n in names] if names else attacks.TRIGGERS.in_order()
    triggers = {name: attacks.get_trigger(name, **per_trigger.get(name, {})) for name in chosen}  # bad params: errors
    x = eval_transform(size)(open_image(Path(image_path)))[None].float() / 255
    tiles = [("clean", x)]
    for name, trigger in triggers.items():
        try:
            tiles.append((trigger.paper_name, attacks.apply(name, x, seed=seed, **per_trigger.get(name, {}))))
        except ParError as e:
            if name in per_trigger:  # what the user asked of this trigger cannot be drawn
                raise
            print(f"gallery: skipping {name}: {e}")  # e.g. badclip without a patch: show the gap, say why
    label_h = 18
    grid = Image.new("RGB", (size * len(tiles), size + label_h), "white")
    draw = ImageDraw.Draw(grid)
    for i, (label, tile) in enumerate(tiles):
        grid.paste(to_pil(tile[0]), (i * size, label_h))
        draw.text((i * size + 4, 3), label, fill="black")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, grid.save)
    return out
