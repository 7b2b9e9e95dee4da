"""Oracles, found by name: independent models that say which objects an image shows (EftCLIP's supervisor).

An oracle maps a batch of decoded ``uint8`` images ``[N, 3, H, W]`` to confidences ``[N, C]`` in
[0, 1] over the defender's class names. It must not share the poisoned CLIP's blind spot: a
trigger is not an object, so where CLIP is sure of the target but the oracle sees no such
object, the image likely carries a trigger (``par.detection``).

* ``world-classifier`` (built in): a small CNN trained only on the defender's *clean* pairs (each
  image labelled by the class its caption names), never on poisoned or test data; its training
  manifest records the CSV and the rows it learnt from. Imperfect as a real oracle is.
* ``torchvision-detector`` (real-world plugin): a torchvision COCO detector (Faster R-CNN,
  MobileNet-v3 320 FPN) with weights the user brings; a class's confidence is the best score of
  the detections of the COCO category of that name; it is blind to the classes COCO lacks (``Oracle.sees``).

A new oracle is a factory registered here or from a plugin (``par.plugins``):
``factory(context: OracleContext) -> Oracle``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from par.data import LabelMentions, read_csv
from par.errors import ParError
from par.registry import Registry
from par.utils import atomic_write_text, digest, file_digest

ORACLES: Registry = Registry("oracle")


@dataclass
class OracleContext:
    """What an oracle may be built from: the class names, the defender's clean data, a cache folder."""

    classnames: List[str]
    clean_data: Optional[str] = None  # image,caption CSV of clean pairs (never the poisoned training set)
    image_root: Optional[str] = None
    workdir: str = "runs/oracles"
    device: str = "cpu"
    params: dict = field(default_factory=dict)  # the oracle's own settings (e.g. weights=PATH)
    progress: bool = True


class Oracle:
    classnames: List[str]

    def confidences(self, images: torch.Tensor) -> torch.Tensor:
        """``[N, C]`` confidences in [0, 1] that each class's object is in each ``uint8`` image."""
        raise NotImplementedError

    def sees(self) -> List[bool]:
        """Per class, whether this oracle can see its object at all: a claim on a class it is blind to (one a
        detector has no category for) is not judged, since its 0 there says nothing about the image."""
        return [True] * len(self.classnames)


def make_oracle(name: str, context: OracleContext) -> Oracle:
    return ORACLES.get(name)(context)


# ---------------------------------------------------------------- built in: the synthetic world's oracle


class SmallCNN(torch.nn.Module):
    """Four conv blocks and a linear head: enough to tell the world's 12 shapes apart, nothing like CLIP."""

    def __init__(self, classes: int, width: int = 32):
        super().__init__()
        layers, channels = [], 3
        for out in (width, 2 * width, 4 * width, 4 * width):
            layers += [torch.nn.Conv2d(channels, out, 3, padding=1), torch.nn.BatchNorm2d(out), torch.nn.ReLU(),
                       torch.nn.MaxPool2d(2)]
            channels = out
        self.features = torch.nn.Sequential(*layers, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        self.head = torch.nn.Linear(channels, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def caption_labels(captions: Sequence[str], classnames: Sequence[str]) -> List[Optional[int]]:
    """The one class each caption names, or None when it names none or several."""
    out, mentions = [], LabelMentions(classnames)
    for caption in captions:
        named = mentions(caption)
        out.append(named[0] if len(named) == 1 else None)
    return out


@dataclass
class WorldClassifierParams:
    size: int = 64
    epochs: int = 6
    batch_size: int = 128
    lr: float = 2e-3
    seed: int = 0
    precise_bn: bool = True  # re-estimate BatchNorm statistics on the training images after training


class WorldClassifier(Oracle):
    """The ``world-classifier`` oracle: a SmallCNN trained on clean pairs, cached by what it learnt from."""

    def __init__(self, context: OracleContext):
        from par.config import build

        self.classnames = list(context.classnames)
        self.params = build(WorldClassifierParams, dict(context.params), "oracle 'world-classifier' params")
        if not context.clean_data:
            raise ParError("oracle 'world-classifier' learns from the defender's clean pairs: give clean data "
                           "(--clean-data, or the cleaning job's train CSV)")
        self.device = torch.device(context.device)
        root = str(Path(context.image_root).resolve()) if context.image_root else None  # where the CSV's images are
        key = file_digest(context.clean_data)[:8] + "-" + digest([self.classnames, vars(self.params), root])[:8]
        folder = Path(context.workdir) / f"world-classifier-{key}"
        self.manifest_path = folder / "manifest.json"
        # seeded here, in a stream of its own: the oracle is a function of what it learns from, not of what
        # the calling process drew before (the first of a benchmark's cells to need it trains it)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(self.params.seed)
            self.model = SmallCNN(len(self.classnames)).to(self.device)
            if self.manifest_path.exists():
                from par.models import load_checkpoint

                self.model.load_state_dict(load_checkpoint(folder / "oracle.safetensors"))
            else:
                self._train(context, folder)
        self.model.eval()

    def _train(self, context: OracleContext, folder: Path) -> None:
        from safetensors.torch import save_file
        from tqdm import tqdm

        from par.data import ImageCaptionDataset, preload, to_float

        frame = read_csv(context.clean_data, ["image", "caption"])
        if "poisoned" in frame.columns and frame["poisoned"].astype(int).any():
            raise ParError(f"{context.clean_data} has poisoned rows: the oracle learns from clean data only")
        labels = caption_labels(frame["caption"].astype(str).tolist(), self.classnames)
        rows = [i for i, label in enumerate(labels) if label is not None]
        if len(rows) < len(self.classnames):
            raise ParError(f"only {len(rows)} captions of {context.clean_data} name exactly one class of the "
                           "class list: too few to train the oracle")
        dataset = ImageCaptionDataset(context.clean_data, lambda texts: torch.zeros(len(texts), 1),
                                      self.params.size, context.image_root)
        subset = torch.utils.data.Subset(dataset, rows)
        images = preload(subset, desc="oracle: decode clean images", progress=context.progress).tensors[0]
        targets = torch.tensor([labels[i] for i in rows])
        generator = torch.Generator().manual_seed(self.params.seed)
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.params.lr, weight_decay=1e-4)
        self.model.train()
        steps = self.params.epochs * (len(rows) // self.params.batch_size + 1)
        bar = tqdm(total=steps, desc="oracle: train world-classifier", unit="step", disable=not context.progress)
        for _ in range(self.params.epochs):
            order = torch.randperm(len(rows), generator=generator)
            for start in range(0, len(rows), self.params.batch_size):
                index = order[start:start + self.params.batch_size]
                x = _flip(to_float(images[index]).to(self.device), generator)
                loss = torch.nn.functional.cross_entropy(self.model(x), targets[index].to(self.device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                bar.update(1)
        bar.close()
        if self.params.precise_bn:
            self._precise_bn(images)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.model.state_dict().items()}, str(folder / "oracle.safetensors"))
        atomic_write_text(self.manifest_path, json.dumps({
            "oracle": "world-classifier", "trained_on": str(Path(context.clean_data).resolve()),
            "trained_on_digest": file_digest(context.clean_data), "rows": rows, "classnames": self.classnames,
            "params": vars(self.params)}, indent=1) + "\n")

    @torch.no_grad()
    def _precise_bn(self, images: torch.Tensor) -> None:
        """BatchNorm's running statistics lag behind weights that moved fast in a short training (the
        oracle scored 56 % in eval mode against 86 % with batch statistics): recompute them as plain
        averages over one pass of the final model on the training images."""
        from par.data import to_float

        norms = [m for m in self.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None  # cumulative average
        self.model.train()
        for start in range(0, len(images), self.params.batch_size):
            self.model(to_float(images[start:start + self.params.batch_size]).to(self.device))
        for norm in norms:
            norm.momentum = 0.1

    @torch.no_grad()
    def confidences(self, images: torch.Tensor) -> torch.Tensor:
        from par.data import to_float

        x = to_float(images.to(self.device))
        if x.shape[-1] != self.params.size:
            x = torch.nn.functional.interpolate(x, size=(self.params.size, self.params.size), mode="bilinear",
                                                antialias=True, align_corners=False)
        return self.model(x).softmax(dim=-1).cpu()


def _flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    flip = torch.rand(images.shape[0], generator=generator) < 0.5
    images[flip] = images[flip].flip(-1)
    return images


ORACLES.add("world-classifier", WorldClassifier, "world")


# ---------------------------------------------------------------- plugin on torchvision: a COCO detector


@dataclass
class DetectorParams:
    weights: str = ""  # the detector's state dict (.pth / .safetensors), brought by the user
    min_score: float = 0.05  # detections below this score are ignored


class TorchvisionDetector(Oracle):
    """Faster R-CNN (MobileNet-v3 large, 320 px, FPN) from torchvision with the user's COCO weights.

    Weights: torchvision's ``fasterrcnn_mobilenet_v3_large_320_fpn`` COCO_V1 file
    (https://download.pytorch.org/models/fasterrcnn_mobilenet_v3_large_320_fpn-907ea3f9.pth), given as
    ``weights=PATH``; loaded with ``weights_only`` and strictly (every key must match).
    """

    URL = "https://download.pytorch.org/models/fasterrcnn_mobilenet_v3_large_320_fpn-907ea3f9.pth"

    def __init__(self, context: OracleContext):
        from torchvision.models.detection import (FasterRCNN_MobileNet_V3_Large_320_FPN_Weights,
                                                  fasterrcnn_mobilenet_v3_large_320_fpn)

        from par.config import build
        from par.models import load_checkpoint

        self.classnames = list(context.classnames)
        self.params = build(DetectorParams, dict(context.params), "oracle 'torchvision-detector' params")
        if not self.params.weights or not Path(self.params.weights).is_file():
            where = f" (not found: {self.params.weights})" if self.params.weights else ""
            raise ParError(f"oracle 'torchvision-detector' needs its COCO weights{where}: download {self.URL} "
                           "and pass --oracle-param weights=PATH")
        categories = FasterRCNN_MobileNet_V3_Large_320_FPN_Weights.COCO_V1.meta["categories"]
        self.category_of = {i: categories.index(c) for i, c in enumerate(self.classnames) if c in categories}
        if not self.category_of:
            raise ParError("none of the class names is a COCO category: the detector cannot see any of them")
        self.device = torch.device(context.device)
        self.model = fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None,
                                                           num_classes=len(categories))
        try:
            self.model.load_state_dict(load_checkpoint(self.params.weights))
        except RuntimeError as e:
            raise ParError(f"{self.params.weights} is not a fasterrcnn_mobilenet_v3_large_320_fpn state dict: "
                           f"{str(e).splitlines()[0]}") from None
        self.model.to(self.device).eval()

    def sees(self) -> List[bool]:
        return [i in self.category_of for i in range(len(self.classnames))]

    @torch.no_grad()
    def confidences(self, images: torch.Tensor) -> torch.Tensor:
        from par.data import to_float

        out = torch.zeros(images.shape[0], len(self.classnames))
        detections = self.model(list(to_float(images.to(self.device))))
        for n, found in enumerate(detections):
            keep = found["scores"] >= self.params.min_score
            labels, scores = found["labels"][keep].cpu(), found["scores"][keep].cpu()
            for i, category in self.category_of.items():
                hits = scores[labels == category]
                out[n, i] = hits.max() if len(hits) else 0.0
        return out


ORACLES.add("torchvision-detector", TorchvisionDetector, "detector")
