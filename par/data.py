"""Datasets in the formats real data comes in: image files listed in CSVs.

* image-caption pairs (CC3M style): a CSV with columns ``image,caption``;
* labelled images (ImageNet-CSV style): a CSV with columns ``image,label`` where
  ``label`` indexes a class-names file (one name per line), or a class-folder tree;
* a class-folder tree as training pairs (FARE/TeCoA's ImageNet training): each image captioned
  ``a photo of a {class}.``, its label kept.

Image paths are relative to ``image_root`` when one is given, else to the CSV's folder.
Datasets return ``uint8`` tensors ``[3, S, S]`` after the model's resize and centre
crop; conversion to float, triggers, augmentation and normalisation happen on the
batch, on the training device, where they are cheap and shared by clean and triggered
data alike.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import List, Optional, Sequence

import torch
from PIL import Image, UnidentifiedImageError

from par.errors import ParError


def read_csv(path: str | os.PathLike, columns: Sequence[str]):
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise ParError(f"CSV not found: {path}")
    try:
        frame = pd.read_csv(path, keep_default_na=False)
    except Exception as e:  # pandas raises several parser error types
        raise ParError(f"cannot parse CSV {path}: {e}") from None
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ParError(f"{path} lacks column(s) {missing}; it has {list(frame.columns)}")
    if len(frame) == 0:
        raise ParError(f"{path} has no rows")
    return frame


def read_lines(path: str | os.PathLike, what: str) -> List[str]:
    path = Path(path)
    if not path.is_file():
        raise ParError(f"{what} file not found: {path}")
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise ParError(f"{what} file {path} is empty")
    return lines


def load_templates(spec: str) -> Sequence:
    """``openai`` for open_clip's 80 ImageNet templates, or a file of ``{}`` templates, one per line."""
    if spec == "openai":
        from open_clip import OPENAI_IMAGENET_TEMPLATES

        return OPENAI_IMAGENET_TEMPLATES
    templates = read_lines(spec, "templates")
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise ParError(f"templates in {spec} must contain '{{}}' where the class name goes; not: {bad[:3]}")
    return templates


def mentions_label(caption: str, label: str) -> bool:
    """Whether ``caption`` names ``label`` as a word (plural allowed): "two bananas" mentions banana."""
    return re.search(rf"\b{re.escape(label.lower())}s?\b", caption.lower()) is not None


def image_paths(frame, csv_path: str | os.PathLike, image_root: Optional[str | os.PathLike] = None) -> List[Path]:
    root = Path(image_root) if image_root else Path(csv_path).parent
    return [root / p for p in frame["image"].astype(str)]


def open_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except FileNotFoundError:
        raise ParError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ParError(f"cannot decode image {path}: {e}") from None


def eval_transform(size: int):
    """The model's preprocessing without normalisation: resize, centre crop, uint8 tensor."""
    from torchvision import transforms

    return transforms.Compose(
        [
            transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(size),
            transforms.PILToTensor(),
        ]
    )


class ImageCaptionDataset(torch.utils.data.Dataset):
    """``(uint8 image, token ids, row index)`` from an ``image,caption`` CSV; an optional integer
    ``label`` column becomes ``labels`` (class indices for supervised objectives), else None."""

    def __init__(self, csv_path, tokenizer, size: int, image_root=None):
        frame = read_csv(csv_path, ["image", "caption"])
        self.paths = image_paths(frame, csv_path, image_root)
        self.captions = frame["caption"].astype(str).tolist()
        self.labels = None
        if "label" in frame.columns:
            try:
                self.labels = torch.tensor(frame["label"].astype(int).tolist())
            except (TypeError, ValueError):
                raise ParError(f"{csv_path}: column 'label' must hold integer class indices") from None
        self.tokens = tokenizer(self.captions)  # tokenised once: cheap, and spares the workers
        self.transform = eval_transform(size)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return self.transform(open_image(self.paths[i])), self.tokens[i], i


class LabelledImageDataset(torch.utils.data.Dataset):
    """``(uint8 image, label)`` from an ``image,label`` CSV with integer labels."""

    def __init__(self, csv_path, num_classes: int, size: int, image_root=None):
        frame = read_csv(csv_path, ["image", "label"])
        try:
            labels = frame["label"].astype(int)
        except (TypeError, ValueError):
            raise ParError(f"{csv_path}: column 'label' must hold integer class indices") from None
        bad = frame.index[(labels < 0) | (labels >= num_classes)].tolist()
        if bad:
            raise ParError(
                f"{csv_path}: {len(bad)} label(s) outside [0, {num_classes - 1}] (first at row {bad[0]}: "
                f"{labels[bad[0]]}); the class-names file lists {num_classes} classes"
            )
        self.paths = image_paths(frame, csv_path, image_root)
        self.labels = torch.tensor(labels.tolist())
        self.transform = eval_transform(size)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return self.transform(open_image(self.paths[i])), self.labels[i]


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm"}


def load_classnames(spec: str) -> List[str]:
    """``imagenet`` for open_clip's 1000 ImageNet class names, else a file with one name per line."""
    if spec == "imagenet":
        from open_clip import IMAGENET_CLASSNAMES

        return list(IMAGENET_CLASSNAMES)
    return read_lines(spec, "class names")


class ImageFolderDataset(torch.utils.data.Dataset):
    """``(uint8 image, label)`` from a class-folder tree (``root/<class>/<image>``).

    Folders named like the class names map by name (CIFAR-style trees); otherwise the sorted
    folder names map in order to the class names (ImageNet's synset folders, whose sorted
    order is the standard class index order of ``IMAGENET_CLASSNAMES``).
    """

    def __init__(self, root, classnames: Sequence[str], size: int):
        root = Path(root)
        if not root.is_dir():
            raise ParError(f"image folder not found: {root}")
        folders = sorted(p for p in root.iterdir() if p.is_dir())
        if not folders:
            raise ParError(f"{root} has no class folders")
        if all(f.name in classnames for f in folders):
            index = {f: list(classnames).index(f.name) for f in folders}
        elif len(folders) == len(classnames):
            index = {f: i for i, f in enumerate(folders)}
        else:
            raise ParError(f"{root} has {len(folders)} class folders but {len(classnames)} class names, "
                           "and the folder names are not class names")
        self.paths, labels = [], []
        for folder in folders:
            for path in sorted(folder.iterdir()):
                if path.suffix.lower() in IMAGE_SUFFIXES:
                    self.paths.append(path)
                    labels.append(index[folder])
        if not self.paths:
            raise ParError(f"no images under {root}")
        self.labels = torch.tensor(labels)
        self.transform = eval_transform(size)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return self.transform(open_image(self.paths[i])), self.labels[i]


class ImageFolderCaptions(torch.utils.data.Dataset):
    """``(uint8 image, token ids, row index)`` from a class-folder tree, each image captioned
    ``template`` with its class name; ``labels`` holds the class indices (for supervised objectives)."""

    def __init__(self, root, classnames: Sequence[str], tokenizer, size: int, template: str = "a photo of a {}."):
        folder = ImageFolderDataset(root, classnames, size)
        self.paths, self.labels, self.transform = folder.paths, folder.labels, folder.transform
        self.captions = [template.format(classnames[i]) for i in self.labels.tolist()]
        self.class_tokens = tokenizer([template.format(c) for c in classnames])  # one row per class, not per image

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return self.transform(open_image(self.paths[i])), self.class_tokens[self.labels[i]], i


def caption_dataset(data, tokenizer, size: int, image_root=None, classnames: Optional[str] = None):
    """Training pairs from an ``image,caption`` CSV, or from a class-folder tree (``classnames``:
    a file or ``imagenet``; by default the folder names are the class names)."""
    if Path(data).is_dir():
        names = load_classnames(classnames) if classnames else sorted(p.name for p in Path(data).iterdir() if p.is_dir())
        return ImageFolderCaptions(data, names, tokenizer, size)
    return ImageCaptionDataset(data, tokenizer, size, image_root)


def labelled_dataset(data, classnames: Sequence[str], size: int, image_root=None) -> torch.utils.data.Dataset:
    """An ``image,label`` CSV or a class-folder tree, whichever ``data`` is."""
    if Path(data).is_dir():
        return ImageFolderDataset(data, classnames, size)
    return LabelledImageDataset(data, len(classnames), size, image_root)


def preload(dataset: torch.utils.data.Dataset, workers: int = 0, desc: str = "decode",
            progress: bool = True) -> torch.utils.data.TensorDataset:
    """Decodes every image once into memory: for small datasets trained for many epochs."""
    from tqdm import tqdm

    loader = torch.utils.data.DataLoader(dataset, batch_size=256, num_workers=workers)
    columns = None
    for batch in tqdm(loader, desc=desc, unit="batch", leave=False, disable=not progress):
        columns = [[] for _ in batch] if columns is None else columns
        for column, part in zip(columns, batch):
            column.append(part)
    return torch.utils.data.TensorDataset(*[torch.cat(column) for column in columns])


class PairLoader:
    """The training loop's view of a map-style pairs dataset (``(image, tokens, row)`` items):
    ``epoch(e, skip)`` yields that epoch's batches ``(images, tokens, captions, labels or None)``,
    reshuffled per epoch and sharded over ranks by a ``ResumableSampler``, from batch ``skip`` on."""

    def __init__(self, dataset, captions: Sequence[str], labels: Optional[torch.Tensor], local_batch: int,
                 rank: int = 0, world_size: int = 1, seed: int = 0, workers: int = 0, pin_memory: bool = False):
        self.captions, self.labels, self.local_batch = captions, labels, local_batch
        self.sampler = ResumableSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                        drop_last=True)
        self.loader = torch.utils.data.DataLoader(dataset, batch_size=local_batch, sampler=self.sampler,
                                                  drop_last=True, num_workers=workers, pin_memory=pin_memory)

    def epoch(self, epoch: int, skip: int = 0):
        self.sampler.set_epoch(epoch)
        self.sampler.skip = skip * self.local_batch
        for images, tokens, rows in self.loader:
            rows = rows.tolist()
            yield images, tokens, [self.captions[i] for i in rows], None if self.labels is None else self.labels[rows]


class ResumableSampler(torch.utils.data.DistributedSampler):
    """A ``DistributedSampler`` that can start part-way into an epoch (for resuming)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.skip = 0

    def __iter__(self):
        return iter(list(super().__iter__())[self.skip:])

    def __len__(self):
        return self.num_samples - self.skip


def to_float(images: torch.Tensor) -> torch.Tensor:
    return images.float().div_(255.0)
