"""The shadow images a scan inverts triggers on: unlabelled, from a CSV's ``image`` column or a folder.

Paths are sorted before anything is drawn from them, so the same images listed in another order give
the same scan; when there are more than ``max_images`` a seeded sample of the sorted list is kept.
Every kept image is decoded before the weights are loaded: one that cannot be decoded is an error
naming it (``par.data.open_image``), never a silently smaller set.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

import torch

from par.data import IMAGE_SUFFIXES, eval_transform, image_paths, open_image, read_csv, to_float
from par.errors import ParError


def list_images(spec: str | os.PathLike, image_root: Optional[str | os.PathLike] = None) -> List[Path]:
    """Every distinct image a CSV (column ``image``, paths relative to ``image_root`` or the CSV's folder) or a
    folder (image files at any depth) names, sorted by path."""
    path = Path(spec)
    if path.is_dir():
        if image_root:
            raise ParError(f"an image root is for a CSV's relative paths; {path} is a folder")
        paths = [p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
        if not paths:
            raise ParError(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) under {path}")
    elif path.is_file():
        frame = read_csv(path, ["image"])
        empty = [i for i, p in enumerate(frame["image"].astype(str)) if not p.strip()]
        if empty:
            raise ParError(f"{path}: line {empty[0] + 2} has an empty image path ({len(empty)} such rows)")
        # each image once, however many rows name it (a CSV with several captions per image): one picture
        # twice would count as two shadow images, and as two embeddings that agree
        paths, seen = [], set()
        for image in image_paths(frame, path, image_root):
            if (resolved := Path(image).resolve()) not in seen:
                seen.add(resolved)
                paths.append(image)
    else:
        raise ParError(f"images not found: {path} (give a CSV with an 'image' column or a folder of images)")
    return sorted(paths, key=str)


def select(paths: List[Path], max_images: int, seed: int) -> List[Path]:
    """At most ``max_images`` of the sorted ``paths``: a seeded sample, kept in sorted order."""
    if len(paths) <= max_images:
        return list(paths)
    order = torch.randperm(len(paths), generator=torch.Generator().manual_seed(seed))[:max_images]
    return [paths[i] for i in sorted(order.tolist())]


def decode(paths: List[Path], size: int, progress: bool = True) -> torch.Tensor:
    """``[N, 3, size, size]`` floats in [0, 1]: the model's resize and centre crop, no normalisation."""
    from tqdm import tqdm

    transform = eval_transform(size)
    images = []
    with tqdm(total=len(paths), desc="decode images", unit="image", leave=False, disable=not progress) as bar:
        for path in paths:  # the bar is closed (its line cleared) also when an image fails
            images.append(transform(open_image(path)))
            bar.update()
    return to_float(torch.stack(images))
