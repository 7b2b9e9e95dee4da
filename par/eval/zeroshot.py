"""Zero-shot clean accuracy (CA), attack success rate (ASR), docs/PAR-NOTES.md section 5, and robust accuracy.

Clean and triggered evaluation share one code path: images are decoded and resized once
per batch, the trigger (if any) is applied to the ``[0, 1]`` batch, then the batch is
normalised and classified against class embeddings built from templates by open_clip's
``build_zero_shot_classifier``. ASR counts only images whose true class is not the
target (the reference code forgets that exclusion). Robust accuracy (``par.eval.robust``) attacks the
same zero-shot classifier on the first ``robust_max_images`` clean images, per eps.
"""
from __future__ import annotations

import json
import numbers
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from par import attacks, models
from par.data import labelled_dataset, load_classnames, load_templates, mentions_label, preload, target_index
from par.embedding import encode_images
from par.errors import ParError
from par.eval.metrics import attack_success_rate, clean_accuracy
from par.eval.retrieval import RetrievalDataset, asr_images, captions_naming, evaluate_retrieval
from par.eval.robust import ROBUST_ATTACKS, ZeroShotLogits, eps_label, robust_accuracy
from par.utils import check_device, check_output_file, pick_device


def zero_shot_classifier(model, tokenizer, classnames: Sequence[str], templates: Sequence, device) -> torch.Tensor:
    """``[embed_dim, num_classes]``: per class, the renormalised mean of its normalised template embeddings."""
    from open_clip import build_zero_shot_classifier

    with torch.inference_mode():
        return build_zero_shot_classifier(
            model, tokenizer=tokenizer, classnames=classnames, templates=templates,
            num_classes_per_batch=10, device=device, use_tqdm=False,
        )


def predict(model, classifier, loader, mean, std, device, trigger=None, seed: int = 0, topk: int = 5, desc="eval",
            progress: bool = True):
    """Top-``topk`` class predictions and true labels; ``trigger`` is applied before normalising."""

    k = min(topk, classifier.shape[1])
    return encode_images(model, loader, mean, std, device, trigger, seed, progress, desc,
                         head=lambda features: (features @ classifier).topk(k, dim=-1).indices)


@dataclass
class EvalConfig:
    checkpoint: str
    model: str
    data: Optional[str] = None  # classification: image,label CSV or class-folder tree
    classnames: str = "imagenet"  # file, or "imagenet"
    templates: str = "openai"
    image_root: Optional[str] = None
    retrieval_json: Optional[str] = None  # retrieval: Karpathy-style JSON
    retrieval_root: Optional[str] = None
    attack: Optional[str] = None
    label: Optional[str] = None
    attack_params: dict = field(default_factory=dict)  # e.g. {"patch_size": 8}
    seed: int = 0
    batch_size: int = 256
    workers: int = 0
    device: str = "auto"
    out: Optional[str] = None  # JSONL results file: one record per evaluation is appended
    robust_eps: List[float] = field(default_factory=list)  # robust accuracy at each L-inf eps (pixels in [0, 1])
    robust_attacks: List[str] = field(default_factory=lambda: ["apgd-ce", "apgd-t"])  # run in this order (cascade)
    robust_steps: int = 100  # iterations per attack (RobustVLM's evaluation: 100)
    robust_max_images: int = 1000  # the first N images of the classification data
    robust_batch_size: Optional[int] = None  # images attacked at once (default batch_size): lower it for ViT-L
    progress: bool = True

    def __post_init__(self):
        """The settings' own sense, checked where they live (CLI, profiles and scripts all come here)."""
        if not self.data and not self.retrieval_json:
            raise ParError("nothing to evaluate: give classification data (CSV or folder) and/or retrieval annotations")
        if self.retrieval_json and not self.retrieval_root:
            raise ParError("retrieval annotations need the image root they are relative to")
        for name, low in (("seed", 0), ("batch_size", 1), ("workers", 0), ("robust_steps", 1),
                          ("robust_max_images", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
                raise ParError(f"eval {name} must be a whole number of at least {low}, got {value!r}")
        if self.robust_batch_size is not None and (isinstance(self.robust_batch_size, bool) or not isinstance(
                self.robust_batch_size, numbers.Integral) or self.robust_batch_size < 1):
            raise ParError(f"eval robust_batch_size must be a whole number of at least 1, got {self.robust_batch_size!r}")
        check_device(self.device)
        bad = [e for e in self.robust_eps if isinstance(e, bool) or not isinstance(e, numbers.Real) or not 0 <= e <= 1]
        if bad:
            raise ParError(f"robust eps must be in [0, 1] (pixels are in [0, 1]), got {bad}")
        if self.robust_eps:
            if not self.data:
                raise ParError("robust evaluation needs classification data (--data)")
            if not self.robust_attacks:
                raise ParError("robust evaluation needs at least one attack (robust_attacks)")
            canonical = [ROBUST_ATTACKS.canonical(name) for name in self.robust_attacks]
            twice = sorted({name for name in canonical if canonical.count(name) > 1})
            if twice:  # one name in the cascade: its 'after' figure would mix two stages
                raise ParError(f"robust_attacks {self.robust_attacks} name {twice} more than once (aliases included)")
        if self.attack:
            if self.label is None or not str(self.label).strip():
                raise ParError("an attack needs the target --label")
            attacks.get_trigger(self.attack, **self.attack_params)  # a known attack, with sound parameters
        elif self.attack_params:
            raise ParError(f"trigger parameters {sorted(self.attack_params)} given without an attack (--attack)")


def evaluate(cfg: EvalConfig, dry_run: bool = False) -> List[dict]:
    """Clean and triggered zero-shot classification and retrieval of one checkpoint.

    Returns one record per evaluation (checkpoint, encoder, attack and parameters, label,
    data, metrics, seconds) and appends them to ``cfg.out``. A dataset that is not
    configured is skipped with a message; having none is an error. Every input is checked
    before the weights are loaded; ``dry_run`` stops there (the checkpoint need not exist yet:
    a cleaning run checks its validation inputs before it starts) and returns no records.
    """

    if cfg.out:
        check_output_file(cfg.out, "results file")
    for what, path in (("classification data", cfg.data), ("retrieval annotations", cfg.retrieval_json),
                       ("retrieval image root", cfg.retrieval_root)):
        if path and not Path(path).exists():
            raise ParError(f"{what} not found: {path}")
    if cfg.robust_eps and not models.has_vision_tower(cfg.model):
        raise ParError(f"robust evaluation attacks images, but encoder {cfg.model!r} has no vision tower config")
    trigger = attacks.get_trigger(cfg.attack, **cfg.attack_params) if cfg.attack else None
    classnames = load_classnames(cfg.classnames) if cfg.data else None
    target = target_index(classnames, cfg.label, cfg.classnames) if trigger is not None and classnames else None
    templates = load_templates(cfg.templates) if cfg.data else None
    device = pick_device(cfg.device)
    model = models.create_model(cfg.model, initialise=False)  # its input size, before the data is read
    size = models.image_size(model)
    dataset = labelled_dataset(cfg.data, classnames, size, cfg.image_root) if cfg.data else None
    retrieval = RetrievalDataset(cfg.retrieval_json, cfg.retrieval_root, size) if cfg.retrieval_json else None
    for data in (dataset, retrieval):
        absent = next((p for p in getattr(data, "paths", []) if not Path(p).is_file()), None)
        if absent is not None:  # a stat per image: cheap beside decoding them, and before the weights load
            raise ParError(f"image not found: {absent}")
    if trigger is not None:  # an ASR over no image is no figure: said before the weights load, not after the work
        if dataset is not None and not bool((dataset.labels != target).any()):
            raise ParError(f"every image of {cfg.data} is of the target class {cfg.label!r}: ASR is undefined")
        named = {owner for caption, owner in zip(retrieval.captions, retrieval.caption_image)
                 if mentions_label(caption, cfg.label)} if retrieval is not None else set()
        if retrieval is not None and len(named) == len(set(retrieval.caption_image)):
            raise ParError(f"every image of {cfg.retrieval_json} has a caption naming {cfg.label!r}: retrieval ASR "
                           "is undefined")
    if dry_run:
        return []
    models.load_weights(model, cfg.checkpoint)  # raises before any evaluation if weights fail
    model = model.to(device).eval()
    mean, std = models.image_mean_std(model)
    tokenizer = models.get_tokenizer(cfg.model)
    base = {"checkpoint": str(cfg.checkpoint), "encoder": models.canonical_model_name(cfg.model),
            "attack": trigger.name if trigger else None, "attack_params": trigger.params() if trigger else None,
            "label": cfg.label, "seed": cfg.seed}
    records = []

    def record(task, condition, data, metrics, started, **extra):
        records.append({**base, "evaluation": f"{task}/{condition}", "data": str(data), **extra,
                        "metrics": metrics, "seconds": round(time.time() - started, 2)})

    if cfg.data:
        started = time.time()
        loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, num_workers=cfg.workers,
                                             pin_memory=device.type == "cuda")
        classifier = zero_shot_classifier(model, tokenizer, classnames, templates, device)
        top, labels = predict(model, classifier, loader, mean, std, device, desc="clean", progress=cfg.progress)
        record("classification", "clean", cfg.data, {"clean_top1": clean_accuracy(top, labels, 1),
                                                    "clean_top5": clean_accuracy(top, labels, 5)},
               started, num_images=len(dataset), num_classes=len(classnames))
        logits_fn = ZeroShotLogits(model, classifier, mean, std)
        for eps in cfg.robust_eps:
            started = time.time()
            result = robust_accuracy(logits_fn, loader, device, eps, cfg.robust_attacks, cfg.robust_steps,
                                     cfg.robust_max_images, cfg.seed, cfg.progress, cfg.robust_batch_size)
            at = eps_label(eps)
            metrics = {f"robust_top1@{at}": result["robust"], f"robust_clean_top1@{at}": result["clean"],
                       **{f"robust_{k}@{at}": v for k, v in result.items() if k.startswith("after_")}}
            record("classification", f"robust@{at}", cfg.data, metrics, started, num_images=result["images"],
                   robust={"eps": eps, "attacks": [ROBUST_ATTACKS.canonical(a) for a in cfg.robust_attacks],
                           "steps": cfg.robust_steps, "norm": "Linf"})
        if trigger is not None:
            started = time.time()
            top, labels = predict(model, classifier, loader, mean, std, device, trigger, cfg.seed,
                                  desc=trigger.name, progress=cfg.progress)
            record("classification", trigger.name, cfg.data, {"asr_top1": attack_success_rate(top, labels, target, 1),
                                                               "asr_top5": attack_success_rate(top, labels, target, 5)},
                   started, num_images=int((labels != target).sum()), num_classes=len(classnames))
    if cfg.retrieval_json:
        started = time.time()
        dataset = retrieval
        common = dict(seed=cfg.seed, batch_size=cfg.batch_size, workers=cfg.workers, progress=cfg.progress)
        metrics, text_emb = evaluate_retrieval(model, tokenizer, dataset, mean, std, device, **common)
        record("retrieval", "clean", cfg.retrieval_json, metrics, started,
               num_images=len(dataset), num_captions=len(dataset.captions))
        if trigger is not None:
            started = time.time()
            metrics, _ = evaluate_retrieval(model, tokenizer, dataset, mean, std, device, trigger, cfg.label,
                                            text_emb=text_emb, **common)
            measured = int(asr_images(captions_naming(dataset.captions, cfg.label), dataset.caption_image,
                                      len(dataset)).sum())
            record("retrieval", trigger.name, cfg.retrieval_json, metrics, started,  # the images ASR is over
                   num_images=measured, num_captions=len(dataset.captions))
    if cfg.out:
        out = Path(cfg.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    return records


class LiveEval:
    """CA/ASR during training on a held-out subset, through the eval transform (never the training augmentation).

    Images are decoded once; each call builds the zero-shot classifier from the current weights.
    """

    def __init__(self, data: str, classnames: str, image_size: int, device, templates: str = "openai",
                 image_root: Optional[str] = None, attack: Optional[str] = None, label: Optional[str] = None,
                 attack_params: Optional[dict] = None, max_images: int = 512, seed: int = 0, progress: bool = True):

        self.classnames = load_classnames(classnames)
        self.templates = load_templates(templates)
        dataset = labelled_dataset(data, self.classnames, image_size, image_root)
        subset = torch.utils.data.Subset(dataset, range(min(max_images, len(dataset))))
        self.data = preload(subset, desc="decode eval images", progress=progress)
        self.trigger, self.target, self.seed = None, None, seed
        if attack:
            self.target = target_index(self.classnames, label, classnames, "live-evaluation label")
            self.trigger = attacks.get_trigger(attack, **(attack_params or {}))
            if not bool((self.data.tensors[1] != self.target).any()):  # else ASR fails at the first evaluation
                raise ParError(f"live evaluation: the first {len(subset)} images of {data} are all of the target "
                               f"class {label!r}, so no attack success rate can be measured on them (shuffle the rows)")
        self.device = device

    def __call__(self, model, tokenizer, mean, std) -> dict:
        with torch.random.fork_rng(devices=[]):  # its loaders draw a seed: training's draws stay as without it
            return self._measure(model, tokenizer, mean, std)

    def _measure(self, model, tokenizer, mean, std) -> dict:
        was_training = model.training
        model.eval()
        loader = torch.utils.data.DataLoader(self.data, batch_size=256)
        classifier = zero_shot_classifier(model, tokenizer, self.classnames, self.templates, self.device)
        top, labels = predict(model, classifier, loader, mean, std, self.device, progress=False)
        result = {"ca": clean_accuracy(top, labels)}
        if self.trigger is not None:
            top, labels = predict(model, classifier, loader, mean, std, self.device, self.trigger, self.seed,
                                  progress=False)
            result["asr"] = attack_success_rate(top, labels, self.target)
        model.train(was_training)
        return result


def merged_metrics(records: List[dict]) -> dict:
    return {k: v for r in records for k, v in r["metrics"].items()}


def format_records(records: List[dict]) -> str:
    """The compact table ``trigger_validate.sh`` prints."""
    names = {"clean_top1": "CA top-1", "clean_top5": "CA top-5", "asr_top1": "ASR top-1", "asr_top5": "ASR top-5",
             "retrieval_asr_top5": "ASR@5"}

    def name(key: str) -> str:
        if "@" in key:  # robust_top1@4/255, robust_after_apgd-ce@4/255: the eps is the record's name already
            return {"robust_top1": "robust top-1", "robust_clean_top1": "CA (same images)"}.get(
                key.split("@")[0], key.split("@")[0].replace("robust_after_", "after "))
        return names.get(key, key.replace("_r", " R@"))

    lines = []
    for r in records:
        parts = [f"{name(k)} {100 * v:.1f}" for k, v in r["metrics"].items()]
        lines.append(f"{r['evaluation']:<30}" + "  ".join(parts))
    return "\n".join(lines)
