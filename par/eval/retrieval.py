"""Image-text retrieval (COCO Karpathy test style): recall@k both ways, and retrieval ASR.

Data: a JSON list of ``{"image": path, "caption": [caption, ...]}`` with an image root.
Text embeddings are computed once and shared by the clean and the triggered pass; image
embeddings go through the same decode -> trigger -> normalise path as classification.
Retrieval ASR (docs/PAR-NOTES.md section 5) is the share of triggered images whose top-5 retrieved
captions contain the target word; images whose own captions already name the target are
left out, as target-class images are left out of the classification ASR.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from par.data import eval_transform, mentions_label, open_image
from par.embedding import encode_images, encode_texts
from par.errors import ParError


class RetrievalDataset(torch.utils.data.Dataset):
    """``(uint8 image, image index)``; ``captions`` and ``caption_image`` hold the texts."""

    def __init__(self, annotations: str | os.PathLike, image_root: str | os.PathLike, size: int):

        path = Path(annotations)
        if not path.is_file():
            raise ParError(f"retrieval annotations not found: {path}")
        try:
            entries = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ParError(f"cannot parse {path}: {e}") from None
        if not isinstance(entries, list) or not entries:
            raise ParError(f"{path} must hold a non-empty JSON list of {{image, caption}} entries")
        self.paths: List[Path] = []
        self.captions: List[str] = []
        self.caption_image: List[int] = []
        index_of = {}  # an image named by several entries (one caption each, say) is one image with their captions
        for i, entry in enumerate(entries):
            missing = [k for k in ("image", "caption") if not isinstance(entry, dict) or k not in entry]
            if missing:
                raise ParError(f"{path}: entry {i} lacks field(s) {missing}")
            captions = entry["caption"] if isinstance(entry["caption"], list) else [entry["caption"]]
            if not captions or not all(isinstance(c, str) and c.strip() for c in captions):
                raise ParError(f"{path}: entry {i} has no usable caption")
            image = Path(image_root) / entry["image"]
            key = os.path.normpath(str(image))
            if key not in index_of:
                index_of[key] = len(self.paths)
                self.paths.append(image)
            self.captions.extend(captions)
            self.caption_image.extend([index_of[key]] * len(captions))
        self.transform = eval_transform(size)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):

        return self.transform(open_image(self.paths[i])), i


def recall_at_k(image_emb: torch.Tensor, text_emb: torch.Tensor, caption_image: Sequence[int],
                ks: Sequence[int] = (1, 5, 10)) -> Dict[str, float]:
    """Image->text and text->image recall@k for normalised embeddings."""
    owner = torch.as_tensor(caption_image)
    sims = image_emb @ text_emb.T  # [images, captions]
    kmax = min(max(ks), sims.shape[1])
    top_captions = sims.topk(kmax, dim=1).indices  # [images, k]
    image_hits = owner[top_captions] == torch.arange(len(image_emb))[:, None]
    top_images = sims.T.topk(min(max(ks), sims.shape[0]), dim=1).indices  # [captions, k]
    text_hits = top_images == owner[:, None]
    metrics = {}
    for k in ks:
        metrics[f"i2t_r{k}"] = image_hits[:, :k].any(dim=1).float().mean().item()
        metrics[f"t2i_r{k}"] = text_hits[:, :k].any(dim=1).float().mean().item()
    return metrics


def asr_images(names_label: torch.Tensor, caption_image: Sequence[int], images: int) -> torch.Tensor:
    """Which images retrieval ASR is measured on (a bool per image): those none of whose captions names the
    label (``names_label``, a bool per caption)."""
    own = torch.zeros(images, dtype=torch.long).index_add_(0, torch.as_tensor(caption_image), names_label.long())
    return own == 0


def captions_naming(captions: Sequence[str], label: str) -> torch.Tensor:
    """A bool per caption: whether it names ``label``."""
    return torch.tensor([mentions_label(c, label) for c in captions], dtype=torch.bool)


def retrieval_asr(triggered_emb: torch.Tensor, text_emb: torch.Tensor, captions: Sequence[str],
                  caption_image: Sequence[int], label: str, k: int = 5) -> float:
    """Share of triggered images (whose own captions do not name ``label``) with ``label`` in a top-``k`` caption."""

    names_label = captions_naming(captions, label)
    keep = asr_images(names_label, caption_image, len(triggered_emb))
    if not keep.any():
        raise ParError(f"every image has a caption naming {label!r}: retrieval ASR is undefined")
    top = (triggered_emb[keep] @ text_emb.T).topk(min(k, len(captions)), dim=1).indices
    return names_label[top].any(dim=1).float().mean().item()


def evaluate_retrieval(model, tokenizer, dataset: RetrievalDataset, mean, std, device, trigger=None,
                       label: Optional[str] = None, seed: int = 0, batch_size: int = 256, workers: int = 0,
                       progress: bool = True, text_emb: Optional[torch.Tensor] = None):
    """(metrics, text embeddings): recall@k on clean images, or retrieval ASR under ``trigger``."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                                         pin_memory=torch.device(device).type == "cuda")

    if text_emb is None:
        text_emb = encode_texts(model, tokenizer, dataset.captions, device)
    images, _ = encode_images(model, loader, mean, std, device, trigger, seed, progress,
                              desc=trigger.name if trigger else "clean")
    if trigger is None:
        return recall_at_k(images.cpu(), text_emb.cpu(), dataset.caption_image), text_emb
    if label is None:
        raise ParError("retrieval ASR needs the target label")
    asr = retrieval_asr(images.cpu(), text_emb.cpu(), dataset.captions, dataset.caption_image, label)
    return {"retrieval_asr_top5": asr}, text_emb
