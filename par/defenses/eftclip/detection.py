"""EftCLIP's detection: flag the pairs where the poisoned CLIP and an independent oracle disagree.

Hossain, Sajeeda, Perla, Shao ("Robust Defense Strategies for Multimodal Contrastive Learning:
Efficient Fine-tuning Against Backdoor Attacks"): a trigger is not an object, so an image on which
the poisoned CLIP is sure of a class that the oracle (``par.oracles``) does not see likely carries
a trigger. For every image-caption pair:

* the *claims*: the poisoned CLIP's zero-shot label with its confidence (view ``clip``) and each
  class the caption names, with confidence 1 (view ``caption``);
* the oracle's *object list*: its ``object_list_size`` most confident classes (EftCLIP's tau);
* the pair is *flagged* when a claim of confidence >= ``theta`` is not on the object list; its
  *score* (for ranking and AUROC) is the largest ``confidence x (1 - oracle's confidence)`` over
  its claims.

Victim labels are ranked by how many more flagged claims they have than clean pairs predict. An
oracle has blind spots of its own (small or thin objects it often misses), so the prediction is
each label's own flag rate, measured apart for the captions' claims and the poisoned CLIP's on a
share of the defender's clean pairs held out of the oracle's training (``calibrate``;
``rank_victims`` says why apart); without clean pairs it is the overall flag rate of the screened
pairs. The top label is the victim; its excess in standard deviations (``z``: noise of the screened
claims and of the rate's estimate) says how strong the evidence is (``significant``: z >=
``VICTIM_Z``). Where the data says which rows were poisoned (our ``poison`` writes a ``poisoned``
column and a manifest), detection rate, precision, recall, AUROC and TPR at 5 % FPR are reported.
The paper's oracle prompts a segmenter with CLIP's object list and re-classifies the crops; with a
classifier oracle the object list is compared directly.
"""
from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from par import models
from par.augment import normalize
from par.data import ImageCaptionDataset, LabelMentions, load_classnames, load_templates, read_csv
from par.embedding import pixels
from par.errors import ParError
from par.eval.metrics import detection_metrics
from par.defenses.eftclip.oracles import ORACLES, Oracle, OracleContext, make_oracle
from par.utils import (atomic_write, atomic_write_text, autocast, check_device, check_output_dir, file_digest,
                       inference_precision, path_digest, pick_device)

VIEWS = ("clip", "caption")
SOURCES = ("caption", "clip")  # a claim the caption makes, and one the poisoned CLIP makes alone
VICTIM_Z = 3.0  # a victim's flagged claims exceed the prediction by this many standard deviations
JUDGING = 2  # the rule's version: 2 leaves aside claims on classes the oracle cannot see


def judging(oracle: str) -> dict:
    """The rule's version, for a detection's settings, where it changed what is detected: with an oracle blind
    to some classes (one overriding ``Oracle.sees``); others' detections are the same as before it."""
    factory = ORACLES.get(oracle)
    return {"judging": JUDGING} if getattr(factory, "sees", Oracle.sees) is not Oracle.sees else {}
PRIOR_CLAIMS = 10  # a label's clean flag rate borrows this many claims at the overall clean rate


@dataclass
class DetectConfig:
    checkpoint: str  # the poisoned CLIP
    model: str
    data: str  # image,caption CSV to screen (the training set the model was poisoned with)
    classnames: str  # the defender's label space: file, or "imagenet"
    out: str
    oracle: str = "world-classifier"
    oracle_params: dict = field(default_factory=dict)
    clean_data: Optional[str] = None  # what a learning oracle learns from: clean pairs, never `data`
    calibrate: float = 0.2  # share of clean_data held out of the oracle to measure each label's flag rate
    oracle_cache: Optional[str] = None  # where trained oracles are kept (default: <out>/oracles)
    image_root: Optional[str] = None
    templates: str = "openai"
    label: Optional[str] = None  # the attack's target when known: the summary says whether it was found
    theta: float = 0.66  # confidence at which a claim counts (EftCLIP's theta)
    object_list_size: int = 3  # length of the oracle's object list (EftCLIP's tau)
    views: List[str] = field(default_factory=lambda: list(VIEWS))
    batch_size: int = 256
    workers: int = 0  # processes decoding the images (250k poisoned pairs: give several)
    device: str = "auto"
    progress: bool = True


def check(cfg: DetectConfig) -> List[str]:
    """Every input problem as a clear error before anything is computed; returns the class names."""
    check_output_dir(cfg.out, "detection folder")
    if cfg.oracle_cache:
        check_output_dir(cfg.oracle_cache, "oracle cache")
    ORACLES.canonical(cfg.oracle)
    check_device(cfg.device)
    if not 0 < cfg.theta <= 1 or cfg.object_list_size < 1:
        raise ParError(f"need 0 < theta <= 1 and object_list_size >= 1, got theta={cfg.theta}, "
                       f"object_list_size={cfg.object_list_size}")
    for name, low in (("batch_size", 1), ("workers", 0)):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ParError(f"detect {name} must be a whole number of at least {low}, got {value!r}")
    if not 0 <= cfg.calibrate < 1:
        raise ParError(f"calibrate is the share of the clean pairs held out of the oracle: need 0 <= calibrate < 1, "
                       f"got {cfg.calibrate}")
    unknown = [v for v in cfg.views if v not in VIEWS]
    if unknown or not cfg.views:
        raise ParError(f"views must be among {list(VIEWS)}, got {cfg.views}")
    classnames = load_classnames(cfg.classnames)
    if cfg.label is not None and cfg.label not in classnames:
        raise ParError(f"target label {cfg.label!r} is not a class in {cfg.classnames}")
    read_csv(cfg.data, ["image", "caption"])  # a CSV without captions fails here
    if cfg.calibrate and not cfg.clean_data:
        raise ParError("calibrating the victim ranking needs the defender's clean pairs: give clean data "
                       "(--clean-data), or calibrate 0 to rank labels against the overall flag rate")
    return classnames


def detect(cfg: DetectConfig) -> dict:
    """Screens ``cfg.data``; writes ``detections.csv`` and ``summary.json`` under ``cfg.out``; returns the summary.

    A finished detection with the same settings and inputs is reused; a different one in the same
    folder is an error (nothing is overwritten).
    """
    from tqdm import tqdm

    from par.eval.zeroshot import zero_shot_classifier

    classnames = check(cfg)
    out = Path(cfg.out)
    settings = {**asdict(cfg), **judging(cfg.oracle), "data_digest": file_digest(cfg.data),
                "checkpoint_digest": file_digest(cfg.checkpoint),
                "clean_data_digest": file_digest(cfg.clean_data) if cfg.clean_data else None,
                "classnames_digest": None if cfg.classnames == "imagenet" else path_digest(cfg.classnames),
                "templates_digest": None if cfg.templates == "openai" else path_digest(cfg.templates)}
    for key in ("out", "progress", "device", "batch_size", "workers", "oracle_cache"):
        settings.pop(key)
    summary_path = out / "summary.json"
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        if summary.get("settings") == json.loads(json.dumps(settings)):
            return summary
        raise ParError(f"{out} holds a detection with other settings or inputs; choose another --out")
    device = pick_device(cfg.device)
    model = models.load_model(cfg.model, cfg.checkpoint, device)  # raises before any work if weights fail
    oracle_data, calibration_data = split_clean(cfg.clean_data, cfg.image_root, cfg.calibrate, out / "clean-split")
    oracle = make_oracle(cfg.oracle, OracleContext(
        classnames, clean_data=oracle_data, image_root=None if calibration_data else cfg.image_root,
        device=str(device), workdir=cfg.oracle_cache or str(out / "oracles"), params=dict(cfg.oracle_params),
        progress=cfg.progress))
    mean, std = models.image_mean_std(model)
    tokenizer = models.get_tokenizer(cfg.model)
    classifier = zero_shot_classifier(model, tokenizer, classnames, load_templates(cfg.templates), device)
    precision = inference_precision(device)
    sees = oracle.sees()

    def screen(csv_path: str, image_root: Optional[str], desc: str) -> List[dict]:
        dataset = ImageCaptionDataset(csv_path, tokenizer, models.image_size(model), image_root)
        rows: List[dict] = []  # judged batch by batch: no N x C matrices (250k x 1,000 floats: 1 GB each)
        with torch.inference_mode():
            batches = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, num_workers=cfg.workers,
                                                  pin_memory=device.type == "cuda")
            for images, _, index in tqdm(batches, desc=desc, unit="batch", disable=not cfg.progress):
                x = pixels(images, device)
                with autocast(precision, device):
                    features = model.encode_image(normalize(x, mean, std), normalize=True)
                # at CLIP's zero-shot scale 100 (OpenAI's trained logit scale), not the model's own: theta then
                # means one confidence for every checkpoint, a tiny one trained with another scale too
                clip_probs = (100.0 * features.float() @ classifier).softmax(dim=-1).cpu()
                rows += disagreements(clip_probs, oracle.confidences(images).float(),
                                      [dataset.captions[i] for i in index.tolist()], classnames, cfg.theta,
                                      cfg.object_list_size, cfg.views, sees, first_row=len(rows))
        return rows

    reference = screen(calibration_data, None, "detect: calibrate on held-out clean pairs") if calibration_data else None
    rows = screen(cfg.data, cfg.image_root, "detect")
    frame = read_csv(cfg.data, ["image", "caption"])
    truth = [int(v) for v in frame["poisoned"]] if "poisoned" in frame.columns else None
    summary = {"settings": settings, "rows": len(rows), "flagged": sum(r["flagged"] for r in rows),
               # what the oracle cannot judge: its blind classes, and the claims on them left out
               "oracle_blind_to": [name for name, seen in zip(classnames, sees) if not seen],
               "unjudged_claims": sum(len(r["unjudged"]) for r in rows),
               "victims": rank_victims(rows, classnames, reference),
               "calibration": {"pairs": len(reference), "flagged": sum(r["flagged"] for r in reference),
                               "oracle_trained_on": oracle_data} if reference is not None else None}
    top = summary["victims"][0] if summary["victims"] else None
    summary["victim"] = top["label"] if top and top["excess"] > 0 else None
    summary["victim_z"] = top["z"] if summary["victim"] else None
    summary["victim_significant"] = bool(summary["victim"]) and top["significant"]
    if cfg.label is not None:
        summary["label"], summary["victim_found"] = cfg.label, summary["victim"] == cfg.label
    if truth is not None:
        summary["metrics"] = detection_metrics([r["score"] for r in rows], [r["flagged"] for r in rows], truth)
    _write_detections(out / "detections.csv", rows, classnames)
    atomic_write_text(summary_path, json.dumps(summary, indent=1) + "\n")
    return summary


def disagreements(clip_probs: torch.Tensor, oracle_conf: torch.Tensor, captions: List[str], classnames: List[str],
                  theta: float, object_list_size: int, views=VIEWS, sees: Optional[List[bool]] = None,
                  first_row: int = 0) -> List[dict]:
    """Per pair: claims, the oracle's object list, flag and score (module docstring); rows are numbered from
    ``first_row``. A claim on a class the oracle is blind to (``sees`` False) is set apart as ``unjudged``:
    neither flagged nor counted."""
    listed = oracle_conf.topk(min(object_list_size, oracle_conf.shape[1]), dim=1).indices
    clip_conf, clip_label = clip_probs.max(dim=1)
    rows, mentions = [], LabelMentions(classnames)
    for i, caption in enumerate(captions):
        made: Dict[int, float] = {}
        captioned = mentions(caption)
        if "clip" in views:
            made[int(clip_label[i])] = float(clip_conf[i])
        if "caption" in views:
            made.update({c: 1.0 for c in captioned})
        claims = {c: conf for c, conf in made.items() if sees is None or sees[c]}
        # what the oracle saw: a detector gives most classes exactly 0, and topk fills a short list with them
        objects = {c for c in listed[i].tolist() if float(oracle_conf[i, c]) > 0}
        unsupported = [c for c, conf in claims.items() if conf >= theta and c not in objects]
        score = max((conf * (1.0 - float(oracle_conf[i, c])) for c, conf in claims.items()), default=0.0)
        rows.append({"row": first_row + i, "flagged": bool(unsupported), "score": score, "unsupported": unsupported,
                     "claims": claims, "unjudged": sorted(set(made) - set(claims)), "caption_labels": captioned, "clip_label": int(clip_label[i]), "clip_confidence": float(clip_conf[i]),
                     "objects": [(int(c), float(oracle_conf[i, c])) for c in listed[i].tolist()]})
    return rows


def split_clean(clean_data: Optional[str], image_root: Optional[str], share: float,
                folder: Path) -> Tuple[Optional[str], Optional[str]]:
    """``(oracle's pairs, calibration pairs)``: ``share`` of the clean pairs (a fixed draw) held out of the
    oracle's training, so the rule's flag rate on them is what an oracle does on pairs it has not seen.
    Both are written under ``folder`` with absolute image paths; ``share`` 0 keeps ``clean_data`` whole."""
    from par.data import image_paths

    if not clean_data or not share:
        return clean_data, None
    frame = read_csv(clean_data, ["image", "caption"])
    frame["image"] = [str(p.resolve()) for p in image_paths(frame, clean_data, image_root)]
    held = int(round(share * len(frame)))
    if held < 1 or held >= len(frame):
        raise ParError(f"calibrate {share} of the {len(frame)} clean pairs of {clean_data} leaves no pairs for "
                       "calibration or none for the oracle")
    order = torch.randperm(len(frame), generator=torch.Generator().manual_seed(0)).tolist()
    parts = {"oracle.csv": frame.iloc[sorted(order[held:])], "calibration.csv": frame.iloc[sorted(order[:held])]}
    folder.mkdir(parents=True, exist_ok=True)
    for name, part in parts.items():
        atomic_write(folder / name, lambda tmp, part=part: part.to_csv(tmp, index=False))
    return str(folder / "oracle.csv"), str(folder / "calibration.csv")


def _claim_counts(rows: List[dict], classes: int) -> Dict[str, Tuple[List[int], List[int]]]:
    """Claims and flagged claims per label, apart for each source (a label the caption names is the caption's)."""
    counts = {source: ([0] * classes, [0] * classes) for source in SOURCES}
    for r in rows:
        captioned = set(r.get("caption_labels", ()))
        for c in r["claims"]:
            claimed, flagged = counts["caption" if c in captioned else "clip"]
            claimed[c] += 1
            flagged[c] += c in r["unsupported"]
    return counts


def rank_victims(rows: List[dict], classnames: List[str], reference: Optional[List[dict]] = None,
                 top: int = 5) -> List[dict]:
    """Labels by excess flagged claims: flagged claims of a label minus its claims times the flag rate
    clean pairs predict for it, with the excess in standard deviations (``z``).

    The predicted rate is measured on ``reference`` (held-out clean pairs screened the same way) for
    each label and each source of a claim apart: the captions' claims give the oracle's own misses
    of the label; the poisoned CLIP's lone claims give its confident mistakes on clean images, which
    the backdoor inflates for its target. Mixing the two would charge the target's captioned claims
    with CLIP's inflated rate and hide the poison. A label seldom claimed borrows ``PRIOR_CLAIMS``
    claims at the source's overall rate. Without ``reference``: the share of screened pairs flagged."""
    counts = _claim_counts(rows, len(classnames))
    if reference:
        ref = _claim_counts(reference, len(classnames))
        rates, measured_on = {}, {}  # measured_on: the claims a rate was estimated from (its own uncertainty)
        for source, (ref_claimed, ref_flagged) in ref.items():
            overall = sum(ref_flagged) / max(1, sum(ref_claimed))
            rates[source] = [(f + PRIOR_CLAIMS * overall) / (n + PRIOR_CLAIMS) for f, n in zip(ref_flagged, ref_claimed)]
            measured_on[source] = [n + PRIOR_CLAIMS for n in ref_claimed]
    else:
        rate = sum(r["flagged"] for r in rows) / max(1, len(rows))
        rates = {source: [rate] * len(classnames) for source in SOURCES}
        measured_on = {source: [len(rows)] * len(classnames) for source in SOURCES}
    entries = []
    for c, name in enumerate(classnames):
        claimed = sum(counts[source][0][c] for source in SOURCES)
        flagged = sum(counts[source][1][c] for source in SOURCES)
        expected = sum(counts[source][0][c] * rates[source][c] for source in SOURCES)
        # binomial noise of the screened claims plus that of the rate's estimate
        variance = sum(counts[source][0][c] * rates[source][c] * (1 - rates[source][c])
                       * (1 + counts[source][0][c] / max(1, measured_on[source][c])) for source in SOURCES)
        excess = flagged - expected
        z = excess / max(1.0, variance) ** 0.5
        entries.append({"label": name, "flagged_claims": flagged, "claims": claimed, "expected": round(expected, 2),
                        "excess": round(excess, 2), "z": round(z, 2), "significant": excess > 0 and z >= VICTIM_Z})
    return sorted(entries, key=lambda e: e["excess"], reverse=True)[:top]


def _write_detections(path: Path, rows: List[dict], classnames: List[str]) -> None:
    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["row", "flagged", "score", "clip_label", "clip_confidence", "caption_labels",
                             "unsupported", "oracle_objects"])
            for r in rows:
                writer.writerow([r["row"], int(r["flagged"]), f"{r['score']:.4f}", classnames[r["clip_label"]],
                                 f"{r['clip_confidence']:.4f}", "|".join(classnames[c] for c in r["caption_labels"]),
                                 "|".join(classnames[c] for c in r["unsupported"]),
                                 "|".join(f"{classnames[c]}:{conf:.3f}" for c, conf in r["objects"])])

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, write)
