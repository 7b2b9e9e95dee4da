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

import collections.abc
import functools
import itertools
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
    if path.is_dir():
        raise ParError(f"{path} is a folder, not a CSV file")
    if not path.is_file():
        raise ParError(f"CSV not found: {path}")
    try:
        frame = pd.read_csv(path, keep_default_na=False, dtype=str)  # as written: an id 007 or a caption 1.50 kept
    except Exception as e:  # pandas raises several parser error types
        raise ParError(f"cannot parse CSV {path}: {e}") from None
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ParError(f"{path} lacks column(s) {missing}; it has {list(frame.columns)}")
    if len(frame) == 0:
        raise ParError(f"{path} has no rows")
    return frame


def integer_labels(frame, csv_path, num_classes: Optional[int] = None) -> List[int]:
    """Column ``label`` as class indices: whole numbers (``0.5`` is no class, not class 0) from 0, and
    below ``num_classes`` when that is known."""
    import numpy as np
    import pandas as pd

    raw = frame["label"]
    values = pd.to_numeric(raw.astype(str).str.strip(), errors="coerce").to_numpy(dtype=float)
    bad = ~np.isfinite(values) | (np.mod(values, 1) != 0) | (values < 0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ParError(f"{csv_path}: column 'label' must hold class indices (whole numbers from 0); "
                       f"line {i + 2} holds {str(raw.iloc[i])!r} ({int(bad.sum())} such rows)")
    labels = values.astype(np.int64)
    if num_classes is not None:
        over = np.flatnonzero(labels >= num_classes)
        if over.size:
            raise ParError(
                f"{csv_path}: {over.size} label(s) outside [0, {num_classes - 1}] (first at line {over[0] + 2}: "
                f"{labels[over[0]]}); the class-names file lists {num_classes} classes"
            )
    return labels.tolist()


def caption_column(frame, csv_path) -> List[str]:
    """Column ``caption`` as text; an empty caption is refused (a pair with nothing to learn from)."""
    captions = frame["caption"].astype(str).tolist()
    empty = [i for i, c in enumerate(captions) if not c.strip()]
    if empty:
        raise ParError(f"{csv_path}: line {empty[0] + 2} has an empty caption ({len(empty)} such rows)")
    return captions


def read_lines(path: str | os.PathLike, what: str) -> List[str]:
    path = Path(path)
    if path.is_dir():
        raise ParError(f"{what} file {path} is a folder, not a file")
    if not path.is_file():
        raise ParError(f"{what} file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ParError(f"{what} file {path} is not UTF-8 text (byte {e.start}: {e.object[e.start:e.start + 1]!r})") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
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
    """Whether ``caption`` names ``label`` as a word, or its plural: "two bananas" mentions banana, "three
    buses" bus, "geese" goose, "computer mice" computer mouse."""
    return _label_pattern(label.lower()).search(caption.lower()) is not None


@functools.lru_cache(maxsize=None)
def _label_forms(label: str) -> tuple:
    """``label`` (lower case) and its plurals: the regular ones, and English's own (inflect)."""
    forms = (label, label + "s", label + "es")
    return forms + (_inflect_engine().plural_noun(label),) if label.strip() else forms


@functools.lru_cache(maxsize=1)
def _inflect_engine():
    import inflect  # English plurals, irregular ones too (mice, geese, people, butterflies, wolves)

    return inflect.engine()


@functools.lru_cache(maxsize=None)
def _label_pattern(label: str) -> "re.Pattern":
    forms = sorted(set(_label_forms(label)), key=len, reverse=True)
    return re.compile(rf"\b(?:{'|'.join(re.escape(form) for form in forms)})\b")


class LabelMentions:
    """Which of many labels a caption names (``mentions_label`` for each, same answers), fast on large label
    sets: a label is tried only on captions holding the first word of one of its forms (1,000 ImageNet
    labels against 250k captions: seconds, where trying every label took minutes)."""

    def __init__(self, labels: Sequence[str]):
        self.labels = [label.lower() for label in labels]
        self.by_word: dict = {}
        self.always: List[int] = []  # labels whose forms start with no word character
        for i, label in enumerate(self.labels):
            starts = [re.match(r"\w+", form) for form in _label_forms(label)]
            if None in starts:
                self.always.append(i)
            for word in {start.group(0) for start in starts if start is not None}:
                self.by_word.setdefault(word, []).append(i)

    def __call__(self, caption: str) -> List[int]:
        """The indices of the labels ``caption`` names, in label order."""
        caption = caption.lower()
        candidates = set(self.always)
        for word in set(re.findall(r"\w+", caption)):
            candidates.update(self.by_word.get(word, ()))
        return [i for i in sorted(candidates) if _label_pattern(self.labels[i]).search(caption)]


def image_paths(frame, csv_path: str | os.PathLike, image_root: Optional[str | os.PathLike] = None) -> List[Path]:
    root = Path(image_root) if image_root else Path(csv_path).parent
    return [root / p for p in frame["image"].astype(str)]


MAX_PIXELS_ENV = "PAR_MAX_IMAGE_PIXELS"  # raises PIL's decompression-bomb limit for genuinely huge images


def to_rgb(img: Image.Image, name: str = "image") -> Image.Image:
    """``img`` as 8-bit RGB, whatever its mode: PIL's own ``convert("RGB")`` clips 16-bit grey
    (``I;16``, ``I``) at 255, so a 16-bit PNG turns white; here samples are scaled to 8 bits instead.

    * ``I;16*`` and ``I``: 16-bit samples, scaled by 255/65535 (``I`` outside [0, 65535] is refused);
    * ``F``: floats in [0, 1] are scaled by 255, floats in [0, 255] kept as 8-bit levels (anything else,
      or a NaN, is refused);
    * transparency (``RGBA``, ``LA``, ``PA``, palettes with a transparent colour): composited on white,
      as a viewer shows it (the colour stored under a transparent pixel is arbitrary, often black);
    * everything else (palette, CMYK, YCbCr, LAB, 1-bit, ...) by PIL's conversion.
    """
    import numpy as np

    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        values = np.asarray(img).astype(np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise ParError(f"cannot decode {name}: {mode} samples outside the 16-bit range [0, 65535] "
                           f"(min {values.min()}, max {values.max()}); convert it to an 8- or 16-bit image")
        grey = ((values * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if mode == "F":
        values = np.asarray(img).astype(np.float64)
        if values.size and not np.isfinite(values).all():
            raise ParError(f"cannot decode {name}: its float samples hold NaN or inf")
        top = values.max() if values.size else 0.0
        if values.size and (values.min() < 0 or top > 255):
            raise ParError(f"cannot decode {name}: float samples in [{values.min():.4g}, {top:.4g}], "
                           "neither [0, 1] nor [0, 255]")
        scale = 255.0 if top <= 1 else 1.0
        return Image.fromarray(np.rint(values * scale).astype(np.uint8), "L").convert("RGB")
    if mode == "La":
        img, mode = img.convert("LA"), "LA"
    if mode in ("RGBA", "RGBa", "LA", "PA") or (mode == "P" and "transparency" in img.info) or (
            mode in ("RGB", "L") and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img if mode == "RGB" else img.convert("RGB")


def _pixel_limit() -> Optional[int]:
    """PIL's decompression-bomb limit (pixels), set from ``$PAR_MAX_IMAGE_PIXELS`` when that is given
    (0 or ``none``: no limit); DataLoader workers inherit the variable, so they read it too."""
    value = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if value:
        try:
            limit = int(float(value)) if value.lower() != "none" else 0
        except ValueError:
            limit = -1
        if limit < 0:
            raise ParError(f"${MAX_PIXELS_ENV} must be a number of pixels (0: no limit), got {value!r}")
        Image.MAX_IMAGE_PIXELS = limit or None
    return Image.MAX_IMAGE_PIXELS


def open_image(path, name: Optional[str] = None) -> Image.Image:
    """The one way par reads an image: a file path or a binary file object (a shard member), as
    8-bit RGB (``to_rgb``); any problem is a ``ParError`` naming ``name`` (default: the path)."""
    import warnings

    name = str(name or path)
    limit = _pixel_limit()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # under twice the limit: decoded
            with Image.open(path) as img:
                img.load()
                return to_rgb(img, name)
    except FileNotFoundError:
        raise ParError(f"image not found: {name}") from None
    except IsADirectoryError:
        raise ParError(f"image {name} is a folder, not an image file") from None
    except Image.DecompressionBombError as e:
        found = re.search(r"\((\d+) pixels\)", str(e))
        pixels = found.group(1) if found else "<pixels>"
        raise ParError(f"image {name} is too large to decode safely ({pixels} pixels, over PIL's decompression-bomb "
                       f"limit of {2 * limit}); if it is genuine, raise the limit: {MAX_PIXELS_ENV}={pixels} "
                       "(0: no limit)") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        raise ParError(f"cannot decode image {name}: {e}") from None


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


class PathList(collections.abc.Sequence):
    """Image paths kept as one numpy buffer of bytes: a loader worker reading a Python list of 1.28M ``Path``
    objects touches each one's reference count and so copies the pages holding them (~0.45 GB per worker,
    per process); one array is read without writing to it. Indexing gives a ``Path``, slicing a list."""

    def __init__(self, paths: Sequence):
        import numpy as np

        encoded = [os.fsencode(p) for p in paths]
        self._blob = b"".join(encoded)  # one object, whatever the count
        self._ends = np.cumsum([len(e) for e in encoded], dtype=np.int64)

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = range(len(self))[i]  # negative indices, and IndexError past the end
        start = int(self._ends[i - 1]) if i else 0
        return Path(os.fsdecode(self._blob[start:int(self._ends[i])]))


class ImageCaptionDataset(torch.utils.data.Dataset):
    """``(uint8 image, token ids, row index)`` from an ``image,caption`` CSV; an optional integer
    ``label`` column becomes ``labels`` (class indices for supervised objectives), else None."""

    def __init__(self, csv_path, tokenizer, size: int, image_root=None):
        frame = read_csv(csv_path, ["image", "caption"])
        self.paths = PathList(image_paths(frame, csv_path, image_root))
        self.captions = caption_column(frame, csv_path)
        self.labels = torch.tensor(integer_labels(frame, csv_path)) if "label" in frame.columns else None
        self.tokens = tokenizer(self.captions)  # tokenised once: cheap, and spares the workers
        self.transform = eval_transform(size)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return self.transform(open_image(self.paths[i])), self.tokens[i], i


class _LabelledImages(torch.utils.data.Dataset):
    """``(uint8 image, label)`` pairs: subclasses set ``paths``, ``labels`` (a tensor) and ``transform``."""

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return self.transform(open_image(self.paths[i])), self.labels[i]


class LabelledImageDataset(_LabelledImages):
    """``(uint8 image, label)`` from an ``image,label`` CSV with integer labels."""

    def __init__(self, csv_path, num_classes: int, size: int, image_root=None):
        frame = read_csv(csv_path, ["image", "label"])
        labels = integer_labels(frame, csv_path, num_classes)
        self.paths = PathList(image_paths(frame, csv_path, image_root))
        self.labels = torch.tensor(labels)
        self.transform = eval_transform(size)


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm"}


def class_key(name: str) -> str:
    """A class name as CLIP's tokenizer sees it (lower case, single spaces): "Banana" and "banana" are one class."""
    return " ".join(name.lower().split())


def target_index(classnames: Sequence[str], label: str, source: str, what: str = "target label") -> int:
    """The class index of an attack's target ``label``. Refused when it is not a class, or when it names two
    (open_clip's ImageNet list names ``missile`` and ``sunglasses`` twice each): the attack success rate
    would leave out the images of one twin only and count predictions of one only."""
    indices = [i for i, name in enumerate(classnames) if name == label]
    if not indices:
        raise ParError(f"{what} {label!r} is not a class in {source}")
    if len(indices) > 1:
        raise ParError(f"{what} {label!r} names {len(indices)} classes of {source} (indices {indices}): an attack "
                       "success rate toward it would count one of them only; choose a label listed once")
    return indices[0]


def load_classnames(spec: str) -> List[str]:
    """``imagenet`` for open_clip's 1000 ImageNet class names, else a file with one name per line."""
    if spec == "imagenet":
        from open_clip import IMAGENET_CLASSNAMES

        return list(IMAGENET_CLASSNAMES)
    names = read_lines(spec, "class names")
    seen = {}
    for i, name in enumerate(names):
        key = class_key(name)
        if key in seen:
            first = names[seen[key]]
            same = f"{first!r} twice" if first == name else f"{first!r} and {name!r}, one class to CLIP,"
            raise ParError(f"class names file {spec} lists {same} (names {seen[key] + 1} and {i + 1}): every class "
                           "needs its own name")
        seen[key] = i
    return names


SYNSET = re.compile(r"n\d+")  # an ImageNet folder: a WordNet id such as n01440764


def folder_key(name: str) -> str:
    """A class folder's name as a class name (``golden_retriever`` and ``Golden Retriever`` name one class)."""
    return class_key(name.replace("_", " "))


def folder_classnames(root) -> List[str]:
    """A class-folder tree's class names read off its folders (``golden_retriever`` is ``golden retriever``),
    for captions; synset folders name no class a caption could say, so those need the class names given."""
    folders = sorted(p.name for p in Path(root).iterdir() if p.is_dir())
    synsets = [name for name in folders if SYNSET.fullmatch(name)]
    if synsets:
        raise ParError(f"{root}: class folders {synsets[:3]} are ImageNet synset ids, which would caption its images "
                       f"'a photo of a {synsets[0]}.': give the class names (train_classnames: imagenet, or a file)")
    return [name.replace("_", " ") for name in folders]


class ImageFolderDataset(_LabelledImages):
    """``(uint8 image, label)`` from a class-folder tree (``root/<class>/<image>``).

    Folders named for the class names map by name, case, spaces and underscores aside (CIFAR-style
    trees); folders named by WordNet id (ImageNet's synsets) map in sorted order to the class names,
    that order being the standard class index order of ``IMAGENET_CLASSNAMES``. Any other tree is
    refused: mapping other names by position would label classes silently wrong. Images come one per
    class in turn.
    """

    def __init__(self, root, classnames: Sequence[str], size: int):
        root = Path(root)
        if not root.is_dir():
            raise ParError(f"image folder not found: {root}")
        folders = sorted(p for p in root.iterdir() if p.is_dir())
        if not folders:
            raise ParError(f"{root} has no class folders")
        keys = {class_key(name): i for i, name in enumerate(classnames)}
        named = [f.name for f in folders if folder_key(f.name) in keys]
        if len(named) == len(folders):
            index = {f: keys[folder_key(f.name)] for f in folders}
            classes = {}
            for folder, label in index.items():
                if label in classes:
                    raise ParError(f"{root}: class folders {classes[label]!r} and {folder.name!r} both name the class "
                                   f"{classnames[label]!r}; keep one folder per class")
                classes[label] = folder.name
        elif named:  # some are: a misspelt one must not shift every class by position
            others = [f.name for f in folders if folder_key(f.name) not in keys]
            raise ParError(f"{root}: class folder(s) {others[:5]} are not class names, though {named[:3]} are; name "
                           "every folder for its class")
        elif not all(SYNSET.fullmatch(f.name) for f in folders):
            others = [f.name for f in folders if not SYNSET.fullmatch(f.name)]
            raise ParError(f"{root}: class folder(s) {others[:5]} are neither class names nor ImageNet synset ids "
                           f"(n01440764, ...); name every folder for its class")
        elif len(folders) == len(classnames):  # ImageNet's synsets: sorted, they are the classes in order
            index = {f: i for i, f in enumerate(folders)}
        else:
            raise ParError(f"{root} has {len(folders)} synset folders but {len(classnames)} class names; synset "
                           "folders map to the class names in sorted order, so there must be one per class")
        per_class = [[(path, index[folder]) for path in sorted(folder.iterdir()) if path.suffix.lower() in IMAGE_SUFFIXES]
                     for folder in folders]
        # round robin over the classes (the first image of each, then the second, ...): an evaluation capped
        # at its first N images (robust accuracy) reads every class, not the first N / (images per class)
        order = [pair for rank in itertools.zip_longest(*per_class) for pair in rank if pair is not None]
        if not order:
            raise ParError(f"no images under {root}")
        self.paths = PathList([path for path, _ in order])
        self.labels = torch.tensor([label for _, label in order])
        self.transform = eval_transform(size)


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
        names = load_classnames(classnames) if classnames else folder_classnames(data)
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
