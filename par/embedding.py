"""The one image-encoding pass every evaluation shares: decode -> trigger -> normalise -> encode.

Classification, retrieval and (robust) evaluation read images through ``encode_images``. A
trigger is applied to the ``[0, 1]`` batch before normalisation, and image ``i`` of the loader
(in loader order) draws its trigger from ``row_seed(seed, i)``: the same image gets the same
trigger instance whatever the batch size, as poisoned rows do (``par.poison``).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from par.augment import normalize
from par.data import to_float
from par.utils import autocast, inference_precision


def pixels(images: torch.Tensor, device, trigger=None, seed: int = 0, first_row: int = 0) -> torch.Tensor:
    """A decoded uint8 batch as float ``[0, 1]`` images on ``device``, triggered when ``trigger`` is given."""
    images = to_float(images.to(device, non_blocking=True))
    if trigger is None:
        return images
    return trigger.apply_rows(images, seed, range(first_row, first_row + images.shape[0]))


@torch.inference_mode()
def encode_images(model, loader, mean, std, device, trigger=None, seed: int = 0, progress: bool = True,
                  desc: str = "images", head: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
    """``(outputs, second column)`` over ``loader``'s ``(uint8 images, labels or indices)`` batches.

    ``outputs`` are the normalised float32 image embeddings, or ``head(embeddings)`` per batch
    (e.g. the top-k classes) when ``head`` is given; both come back on the CPU.
    """
    from tqdm import tqdm

    precision = inference_precision(device)
    outputs, second, row = [], [], 0
    for images, column in tqdm(loader, desc=desc, unit="batch", leave=False, disable=not progress):
        images = pixels(images, device, trigger, seed, row)
        row += images.shape[0]
        with autocast(precision, device):
            features = model.encode_image(normalize(images, mean, std), normalize=True).float()
        outputs.append((head(features) if head is not None else features).cpu())
        second.append(torch.as_tensor(column).cpu())
    return torch.cat(outputs), torch.cat(second)


@torch.inference_mode()
def encode_texts(model, tokenizer, texts: Sequence[str], device, batch_size: int = 512) -> torch.Tensor:
    """Normalised float32 text embeddings, in batches."""
    chunks = [model.encode_text(tokenizer(list(texts[i:i + batch_size])).to(device), normalize=True).float()
              for i in range(0, len(texts), batch_size)]
    return torch.cat(chunks)
