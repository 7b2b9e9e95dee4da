"""The figures every evaluation reports, in one place: clean accuracy and ASR from top-k predictions,
AUROC and detection rates from scores (detections now, checkpoint scans next)."""
from __future__ import annotations

from typing import List

import torch

from par.errors import ParError


def clean_accuracy(top_predictions: torch.Tensor, labels: torch.Tensor, k: int = 1) -> float:
    """Share of images whose true class is among the top-``k`` predictions."""
    return (top_predictions[:, :k] == labels[:, None]).any(dim=1).float().mean().item()


def attack_success_rate(top_predictions: torch.Tensor, labels: torch.Tensor, target: int, k: int = 1) -> float:
    """Share of triggered images *not of the target class* whose top-``k`` predictions contain the target."""
    keep = labels != target
    if not keep.any():
        raise ParError("no test image outside the target class: ASR is undefined")
    return (top_predictions[keep, :k] == target).any(dim=1).float().mean().item()


def auroc(scores: List[float], truth: List[int]) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties)."""
    from scipy.stats import rankdata

    positives = sum(truth)
    negatives = len(truth) - positives
    if not positives or not negatives:
        raise ParError("AUROC needs both poisoned and clean rows")
    ranks = rankdata(scores)
    return float((sum(r for r, t in zip(ranks, truth) if t) - positives * (positives + 1) / 2) / (positives * negatives))


def tpr_at_fpr(scores: List[float], truth: List[int], fpr: float = 0.05) -> float:
    """Share of poisoned rows scored above the threshold that flags at most ``fpr`` of the clean rows."""
    clean = sorted((s for s, t in zip(scores, truth) if not t), reverse=True)
    allowed = int(fpr * len(clean))  # clean rows that may score above the threshold
    threshold = clean[allowed] if allowed < len(clean) else float("-inf")
    poisoned = [s for s, t in zip(scores, truth) if t]
    return sum(s > threshold for s in poisoned) / len(poisoned)


def detection_metrics(scores: List[float], flagged: List[bool], truth: List[int]) -> dict:
    hits = sum(f and t for f, t in zip(flagged, truth))
    positives, flags = sum(truth), sum(flagged)
    negatives = len(truth) - positives
    return {"poisoned_rows": positives, "detection_rate": hits / positives if positives else None,
            "false_positive_rate": (flags - hits) / negatives if negatives else None,
            "precision": hits / flags if flags else None, "recall": hits / positives if positives else None,
            "auroc": auroc(scores, truth) if positives and negatives else None,
            "tpr_at_5pct_fpr": tpr_at_fpr(scores, truth) if positives and negatives else None}
