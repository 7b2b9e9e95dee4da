"""The scan table: does a scanner tell the benchmark's poisoned models from clean ones, and name the target?

Every scanner of the profile's ``scan`` part scans every poisoned model and the clean controls:

* the foundation (never poisoned);
* the poisoning recipe at 0 % poison under other seeds: identical to a poisoned model but for the poison,
  the honest control (a scanner that flags fine-tunes as such fails here);
* shorter benign fine-tunes of the foundation on the clean split (the profile's ``clean`` budget with
  the plain CLIP loss), other data than the poisoning's.

Scanners flag by their own documented thresholds, which are never set on these models. Per scanner the
table reports the AUROC of its margin over the threshold (poisoned vs clean), TPR and FPR at the
threshold, how often the target label is named among the poisoned models, and seconds per scan.
Every model and scan lands in a folder named by what it depends on, so a re-run reuses them.
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from par.app import pipeline
from par.attacks import TRIGGERS
from par.app.profile import Profile, ScanBench, check_jobs, check_named_once
from par.config import build
from par.errors import ParError
from par.eval.metrics import auroc
from par.scan import ScanConfig, make_scanner
from par.scan.folder import request_of, run_scan, scan_folder
from par.scan.run import check as check_scan
from par.utils import digest

COLUMNS = ["scanner", "model", "kind", "attack", "asr", "flagged", "margin", "value", "threshold", "target",
           "named_target", "top_label", "family", "seconds", "folder"]
BACKDOORED_ASR = 0.9  # a poisoned model whose ASR reaches this carries its backdoor (the benchmark's bar)


@dataclass
class Scanned:
    """One model to scan: ``kind`` is ``poisoned`` or ``clean``; ``attack`` and ``asr`` for poisoned ones."""

    name: str
    kind: str
    checkpoint: Path
    attack: str = ""
    asr: Optional[float] = None


def clean_controls(profile: Profile, out: Path, world: pipeline.World) -> List[Scanned]:
    """The foundation, its 0 %-poison fine-tunes and its benign fine-tunes (trained once, then reused)."""
    foundation, controls = _controls(profile, out, world)
    return [Scanned("foundation", "clean", Path(foundation))] + [Scanned(name, "clean", train()) for name, train in controls]


def control_trainings(profile: Profile, out: Path, world: pipeline.World) -> List[Callable[[], Path]]:
    """The clean controls' trainings (each returns its checkpoint), to run before ``clean_controls`` reuses them."""
    return [train for _, train in _controls(profile, out, world)[1]]


def _controls(profile: Profile, out: Path, world: pipeline.World) -> Tuple[Path, List[Tuple[str, Callable[[], Path]]]]:
    """(the foundation, [(name, its training)]) of the clean controls."""
    part: ScanBench = profile.scan
    foundation, foundation_key = pipeline.foundation_stage(profile, out, world)
    shared = world.cache or Path(out)
    controls = []
    scratch = profile.poisoning_mode() == "scratch"
    recipe = dict(profile.pretrain) if scratch else {**profile.poison_finetune, "init_checkpoint": str(foundation)}
    for seed in part.zero_poison_seeds:
        values = {**recipe, "seed": seed}
        folder = shared / f"zero-poison-{digest([world.key, foundation_key, pipeline.stage_key(world, values)])}"
        controls.append((f"0 % poison, seed {seed}", functools.partial(_train, world, values, "train", folder)))
    if part.benign_seeds and not profile.clean:
        raise ParError("profile 'scan' benign_seeds fine-tune with the 'clean' budget: the profile has none")
    benign = {**profile.clean, "objective": "clip", "augment": "none", "objective_params": {"train_logit_scale": False},
              "init_checkpoint": str(foundation)}
    for seed in part.benign_seeds:
        values = {**benign, "seed": seed}
        folder = shared / f"benign-{digest([world.key, foundation_key, pipeline.stage_key(world, values)])}"
        controls.append((f"benign fine-tune, seed {seed}", functools.partial(_train, world, values, "clean", folder)))
    return Path(foundation), controls


def _train(world: pipeline.World, values: dict, split: str, folder: Path) -> Path:
    from par.train import train_config

    cfg = train_config({**pipeline.IN_MEMORY, **values, "model": world.model,
                        "train_data": str(world.path / f"{split}.csv"), "out": str(folder)}, "profile 'scan' control")
    return pipeline.trained(cfg)


def check_scanners(profile: Profile) -> None:
    """Before any model is built: every scanner of the profile's scan table has a threshold for its encoder
    (the table judges each by its documented one)."""
    for name in profile.scan.scanners:
        make_scanner(name, profile.scan.scanner_params.get(name)).documented_threshold(pipeline.world_model(profile))


def scan_model(world: pipeline.World, model: Scanned, scanner: str, part: ScanBench, progress: bool = False) -> dict:
    """scan.json's record of ``scanner`` on ``model`` (a folder beside the checkpoint, reused when identical)."""
    values = {"checkpoint": str(model.checkpoint), "model": world.model,
              "images": str(world.path / f"{part.images}.csv"), "scanner": scanner,
              "scanner_params": dict(part.scanner_params.get(scanner) or {}),
              "classnames": str(world.path / "classnames.txt"), "templates": str(world.path / "templates.txt"),
              "max_images": part.max_images, "seed": part.seed, "progress": progress}
    cfg = build(ScanConfig, values, f"profile 'scan' ({scanner})")
    checked = check_scan(cfg)  # once: it resolves every image path listed
    request = request_of(cfg, checked)
    folder = scan_folder(model.checkpoint.parent, request)  # the folder invert's scan of this checkpoint reuses
    record, _ = run_scan(cfg, folder, request, checked)
    return {**record, "folder": str(folder)}


def margin(record: dict) -> float:
    """How far past its threshold a scan's statistic lies, positive when flagged (for AUROC)."""
    value, threshold = record["value"], record["threshold"]
    return value - threshold if record["flagged_when"].startswith("above") else threshold - value


def top_label(record: dict) -> Optional[str]:
    """The label a label scanner points at, flagged or not (its top row); None for label-free ones."""
    return record["target"] or (record.get("details") or {}).get("top_label")


def scan_models(profile: Profile, world: pipeline.World, models: List[Scanned], progress: bool = True) -> List[tuple]:
    """(scanner, model, scan.json's record) for every scanner of the profile's scan part on every model."""
    done = []
    for scanner in profile.scan.scanners:
        for model in models:
            if progress:
                print(f"scan ({scanner}): {model.name}", flush=True)
            done.append((scanner, model, scan_model(world, model, scanner, profile.scan)))
    return done


def scan_rows(profile: Profile, out: Path, world: pipeline.World, poisoned: List[Scanned],
              progress: bool = True) -> List[dict]:
    """One row per scanner and model: the poisoned models given, then the clean controls."""
    models = poisoned + clean_controls(profile, out, world)
    rows = []
    for scanner, model, record in scan_models(profile, world, models, progress):
        rows.append({"scanner": scanner, "model": model.name, "kind": model.kind, "attack": model.attack,
                     "asr": model.asr, "flagged": record["verdict"] == "backdoored", "margin": margin(record),
                     "value": record["value"], "threshold": record["threshold"], "target": record["target"] or "",
                     "named_target": model.kind == "poisoned" and record["target"] == profile.label,
                     "top_label": top_label(record) or "", "family": record["family"] or "",
                     "seconds": record["seconds"], "folder": record["folder"]})
    return rows


def summarize(rows: List[dict], label: str) -> List[dict]:
    """Per scanner: AUROC of the margin (every poisoned model vs the clean ones, and backdoored ones only),
    TPR / FPR at the threshold, target named, mean seconds per scan."""
    summary = []
    for scanner in dict.fromkeys(r["scanner"] for r in rows):
        mine = [r for r in rows if r["scanner"] == scanner]
        clean = [r for r in mine if r["kind"] == "clean"]
        poisoned = [r for r in mine if r["kind"] == "poisoned"]
        backdoored = [r for r in poisoned if (r["asr"] or 0) >= BACKDOORED_ASR]

        def area(positives):
            if not positives or not clean:
                return None
            return auroc([r["margin"] for r in positives + clean], [1] * len(positives) + [0] * len(clean))

        flagged = sum(r["flagged"] for r in poisoned)
        summary.append({
            "scanner": scanner, "poisoned": len(poisoned), "backdoored": len(backdoored), "clean": len(clean),
            "auroc": area(poisoned), "auroc_backdoored": area(backdoored),
            "flagged": flagged, "tpr": flagged / max(len(poisoned), 1),
            "clean_flagged": sum(r["flagged"] for r in clean),
            "named": sum(r["named_target"] for r in poisoned),
            "seconds": statistics.mean(r["seconds"] for r in mine) if mine else None})
    return summary


def write_scan_tables(out: Path, rows: List[dict], label: str, report: str = "scan") -> List[str]:
    """``<report>.csv`` (one row per scan) and the markdown lines of the table (also ``<report>.md``)."""
    out = Path(out)
    with (out / f"{report}.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    fmt = lambda v, spec="{:.3f}": "–" if v is None else spec.format(v)  # noqa: E731
    lines = [f"Checkpoint scans (target '{label}'): per scanner, AUROC of its margin over its threshold "
             f"(poisoned vs clean; 'backdoored': poisoned models with ASR >= {100 * BACKDOORED_ASR:.0f} %), "
             "TPR and FPR at the scanner's documented threshold, target named among the poisoned models, "
             "seconds per scan.", "",
             "| scanner | AUROC (all poisoned) | AUROC (backdoored) | TPR | clean flagged | target named | s / scan |",
             "|---|---|---|---|---|---|---|"]
    for s in summarize(rows, label):
        lines.append(f"| `{s['scanner']}` | {fmt(s['auroc'])} | {fmt(s['auroc_backdoored'])} | "
                     f"{s['flagged']} / {s['poisoned']} | {s['clean_flagged']} / {s['clean']} | "
                     f"{s['named']} / {s['poisoned']} | {fmt(s['seconds'], '{:.1f}')} |")
    lines += ["", "| scanner | model | ASR | verdict | margin | target (top label) | family |",
              "|---|---|---|---|---|---|---|"]
    for r in rows:
        asr = "" if r["asr"] is None else f"{100 * r['asr']:.1f}"
        verdict = "backdoored" if r["flagged"] else "clean"
        named = r["target"] or (f"({r['top_label']})" if r["top_label"] else "–")
        lines.append(f"| `{r['scanner']}` | {r['model']} | {asr} | {verdict} | {r['margin']:+.2f} | {named} | "
                     f"{r['family']} |")
    (out / f"{report}.md").write_text("\n".join(lines) + "\n")
    return lines


def run_scan_bench(profile: Profile | str, out: str, attacks: Optional[List[str]] = None,
                   progress: bool = True, report: str = "scan", quick: bool = False,
                   jobs: Optional[int] = None) -> Path:
    """The scan table alone: the profile's poisoned models (built or reused) and clean controls, scanned.
    Writes ``<report>.csv`` and ``<report>.md`` in ``out`` (``scan``: the names the benchmark gives its own).
    ``jobs`` (default: the profile's) trains that many models at once, as the benchmark does (the same models)."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", report or ""):
        raise ParError(f"scan report must be a file stem (letters, digits, . _ -), got {report!r}")
    if not isinstance(profile, Profile):
        profile = Profile.load(profile)
    if quick:
        profile = profile.quick_profile()
    if profile.scan is None:
        raise ParError("the profile has no 'scan' part (scanners, clean controls): nothing to scan")
    if jobs is not None:  # the caller's, over the profile's
        check_jobs(jobs, "scan jobs")
        profile = dataclasses.replace(profile, jobs=jobs)
    if profile.jobs > 1:
        profile = profile.one_thread()
    names = [TRIGGERS.canonical(a) for a in (attacks or profile.attacks or TRIGGERS.in_order())]  # before any work
    check_named_once(names, "scan attacks name")
    pipeline.check_attacks(profile, names)
    check_scanners(profile)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    world = pipeline.make_world_stage(profile, out)
    built = {}
    for attack, (model, error) in pipeline.build_poisoned_models(profile, out, world, names,
                                                                 beside=control_trainings(profile, out, world)).items():
        if error:
            raise ParError(f"the poisoned model of {attack} could not be built: {error}")
        built[attack] = model
    rows = scan_rows(profile, out, world, poisoned_entries(built), progress)
    write_scan_tables(out, rows, profile.label, report)
    print(f"scan results: {out / f'{report}.md'}")
    return out


def poisoned_entries(built: Dict[str, tuple]) -> List[Scanned]:
    """Poisoned models (``pipeline.build_poisoned``'s, by attack) as models to scan."""
    return [Scanned(f"poisoned ({attack})", "poisoned", Path(model.checkpoint), attack, metrics["asr_top1"])
            for attack, (model, _, metrics, _) in built.items()]
