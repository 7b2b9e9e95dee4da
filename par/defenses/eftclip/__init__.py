"""EftCLIP (Hossain et al.): detect poisoned pairs in the poisoned training set with an oracle
(``detection``, ``oracles``), then fine-tune on a curated set."""
from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, List

from par.config import build
from par.defenses.eftclip.detection import VIEWS, DetectConfig, judging
from par.defenses.base import CleaningJob, MultiStageDefense
from par.defenses.finetune import FineTune, defense
from par.errors import ParError
from par.utils import atomic_write, atomic_write_text, digest, file_digest, file_lock


@dataclass
class EftCLIPParams:
    """The ``eftclip`` mapping of a cleaning job's settings (the rest is the fine-tuning budget)."""

    oracle: str = DetectConfig.oracle
    oracle_params: dict = field(default_factory=dict)
    theta: float = DetectConfig.theta  # confidence at which a claim counts
    object_list_size: int = DetectConfig.object_list_size  # length of the oracle's object list (EftCLIP's tau)
    calibrate: float = DetectConfig.calibrate  # share of the clean pairs held out of the oracle to calibrate the victim ranking
    views: List[str] = field(default_factory=lambda: list(VIEWS))
    victims: int = 1  # top-ranked labels treated as victims
    victim_weight: int = 2  # unflagged pairs of a victim label appear this many times in the curated set

    def __post_init__(self):
        if not 0 <= self.victims <= 5:  # the ranking names the 5 most over-flagged labels
            raise ParError(f"eftclip victims must be between 0 and 5, got {self.victims}")
        if self.victim_weight < 1:
            raise ParError(f"eftclip victim_weight must be at least 1 (1: no up-weighting), got {self.victim_weight}")


@defense("eftclip")
class EftCLIP(MultiStageDefense):
    """EftCLIP (Hossain et al.): detect the pairs where the poisoned CLIP and an oracle disagree in the
    poisoned training set (``par.detection``), pinpoint the victim label, curate a compact set (flagged
    pairs dropped, the victim label's unflagged pairs up-weighted) and fine-tune on it with the CLIP loss.

    Its threat model gives the defender the poisoned training set (``job.poisoned_data``); a learning
    oracle learns from the job's clean pairs (``job.train_data``) only.
    """

    name = "eftclip"
    stages = ("detect", "curate", "finetune")
    objective = "clip"
    report_fields = ("detection_victim", "detection_victim_found", "detection_auroc", "detection_tpr_at_5pct_fpr",
                     "detection_rate", "detection_false_positive_rate")

    def report(self, run_dir: Path, target: str) -> Dict:
        """What the detection found, from ``defense-report.json`` (the benchmark's detection columns)."""
        path = Path(run_dir) / "defense-report.json"
        if not path.exists():
            return {}
        found = json.loads(path.read_text())["detection"]
        metrics = found.get("metrics") or {}
        return {"detection_victim": found["victim"], "detection_victim_found": found["victim"] == target,
                "detection_auroc": metrics.get("auroc"), "detection_tpr_at_5pct_fpr": metrics.get("tpr_at_5pct_fpr"),
                "detection_rate": metrics.get("detection_rate"),
                "detection_false_positive_rate": metrics.get("false_positive_rate")}

    def tables(self, rows: List[dict], attacks: List[str], target: str) -> List[str]:
        """Per attack: the victim label found, and poisoned-row detection (mean over seeds)."""
        # every cell whose detection ran, a seed that found no victim label too (leaving it out would
        # average the seeds that found one only)
        rows = [r for r in rows if r.get("detection_victim_found") not in (None, "")]
        if not rows:
            return []

        def mean(found, key, scale=100, digits=1):
            values = [float(r[key]) for r in found if r.get(key) not in (None, "")]
            return f"{scale * statistics.mean(values):.{digits}f}" if values else "–"

        lines = [f"Detection of poisoned training pairs (target '{target}'): victim label found (seeds agreeing), "
                 "AUROC, and in % the TPR at 5 % FPR and the flagged share of poisoned / clean rows.", "",
                 "| attack | defense | victim found | AUROC | TPR @ 5 % FPR | detection rate | false positives |",
                 "|---|---|---|---|---|---|---|"]
        for attack in attacks:
            for column in sorted({r["defense"] for r in rows if r["attack"] == attack}):
                found = [r for r in rows if r["attack"] == attack and r["defense"] == column]
                victims = sorted({str(r["detection_victim"]) if r.get("detection_victim") not in (None, "") else "none"
                                  for r in found})
                agree = sum(str(r["detection_victim_found"]) == "True" for r in found)
                lines.append(f"| `{attack}` | {column} | {'/'.join(victims)} ({agree}/{len(found)}) | "
                             f"{mean(found, 'detection_auroc', 1, 3)} | {mean(found, 'detection_tpr_at_5pct_fpr')} | "
                             f"{mean(found, 'detection_rate')} | {mean(found, 'detection_false_positive_rate')} |")
        return lines

    @staticmethod
    def params(job: CleaningJob) -> EftCLIPParams:
        return build(EftCLIPParams, dict(job.settings.get("eftclip") or {}), "settings 'eftclip'")

    def detect(self, job: CleaningJob, outputs: dict) -> dict:
        from par.defenses.eftclip.detection import detect

        if not job.poisoned_data:
            raise ParError("eftclip screens the data the model was poisoned with: give it (--poisoned-data)")
        if not job.classnames:
            raise ParError("eftclip reasons in class labels: give the class names (--classnames)")
        p = self.params(job)
        inputs = [file_digest(job.checkpoint), file_digest(job.poisoned_data), file_digest(job.train_data),
                  job.classnames, job.templates, p.oracle, p.oracle_params, p.theta, p.object_list_size, p.views,
                  p.calibrate] + list(judging(p.oracle).values())
        # beside the run folder and keyed by what it depends on: a benchmark's seeds share one detection
        folder = Path(job.out).parent / "eftclip-detections" / digest(inputs)
        with file_lock(folder.parent.with_suffix(".lock")):  # cells side by side share detections and oracles
            summary = detect(DetectConfig(
                checkpoint=job.checkpoint, model=job.model, data=job.poisoned_data, classnames=job.classnames,
                templates=job.templates, out=str(folder), oracle=p.oracle, oracle_params=p.oracle_params,
                clean_data=job.train_data, oracle_cache=str(Path(job.out).parent / "oracles"),
                image_root=job.image_root, theta=p.theta, object_list_size=p.object_list_size, views=p.views,
                calibrate=p.calibrate, progress=job.settings.get("progress", True),
                workers=int(job.settings.get("workers", 0))))  # the fine-tune's loader workers decode here too
        return {**summary, "folder": str(folder)}

    def curate(self, job: CleaningJob, outputs: dict) -> Path:
        import pandas as pd

        from par.data import image_paths, load_classnames, mentions_label, read_csv

        path, report = Path(job.out) / "curate" / "curated.csv", Path(job.out) / "defense-report.json"
        p, summary = self.params(job), outputs["detect"]
        curation = {"detection": summary["folder"], "victims": p.victims, "victim_weight": p.victim_weight}
        if path.exists() and report.exists() and json.loads(report.read_text()).get("curation") == curation:
            return path  # curated before the same way from the same detection (its folder is keyed by its inputs)
        victims = [v["label"] for v in summary["victims"][: p.victims] if v["excess"] > 0]
        flagged = read_csv(Path(summary["folder"]) / "detections.csv", ["row", "flagged"])["flagged"].astype(int).astype(bool).tolist()
        frame = read_csv(job.poisoned_data, ["image", "caption"])
        frame["image"] = [str(path.resolve()) for path in image_paths(frame, job.poisoned_data, job.image_root)]
        kept = frame[[not f for f in flagged]][["image", "caption"]]
        if kept.empty:
            raise ParError(f"eftclip flagged all {len(frame)} pairs: nothing is left to fine-tune on (the oracle "
                           "disagrees with everything; check it, or raise object_list_size / theta)")
        names = set(load_classnames(job.classnames))
        victim_rows = kept[[any(mentions_label(c, v) for v in victims if v in names) for c in kept["caption"]]]
        curated = pd.concat([kept] + [victim_rows] * (p.victim_weight - 1), ignore_index=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: curated.to_csv(tmp, index=False))
        # the report last: it says which detection the curated pairs above came from
        atomic_write_text(report, json.dumps({
            "detection": {"rows": summary["rows"], "flagged": summary["flagged"], "victim": summary["victim"],
                          "victims": summary["victims"], "metrics": summary.get("metrics"),
                          "folder": summary["folder"]},
            "curation": curation, "curated_pairs": len(curated), "dropped": int(sum(flagged)),
            "victim_pairs_upweighted": len(victim_rows)}, indent=1) + "\n")
        return path

    def finetune(self, job: CleaningJob, outputs: dict) -> Path:
        return FineTune(self.objective).clean(self._finetune_job(job, str(outputs["curate"])))

    @staticmethod
    def _finetune_job(job: CleaningJob, curated: str) -> CleaningJob:
        settings = {k: v for k, v in job.settings.items() if k != "eftclip"}
        return replace(job, train_data=curated, settings=settings, out=str(Path(job.out) / "finetune"), image_root=None)

    def check(self, job: CleaningJob) -> None:
        from par.defenses.eftclip.oracles import ORACLES

        ORACLES.canonical(self.params(job).oracle)
        FineTune(self.objective).check(self._finetune_job(job, job.train_data))
