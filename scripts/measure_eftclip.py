"""Measures EftCLIP on the synthetic world: does it find the backdoor's target label and the poisoned rows
for every attack, and how do its cleaned CA/ASR compare with the other defenses' (same seeds)?

    python scripts/measure_eftclip.py [--config configs/bench.yaml] [--out runs/bench] [--seeds 0]
                                      [--attacks badnet_rs,blended]

Runs the benchmark's ``eftclip`` cells (shared with the full benchmark, whose report it leaves alone:
it writes <out>/eftclip.{csv,md}) and prints, per attack: the victim found, AUROC, TPR at 5 % FPR,
detection rate and false positives, and EftCLIP's CA/ASR next to each defense of <out>/results.csv
(the full benchmark's, when it is there) at the same seeds. Writes <out>/eftclip-measurement.json.
Aims (reported, never asserted): victim 'banana' for every attack; AUROC >= 0.95 on patch triggers.
"""
import argparse
import csv
import json
import statistics
import sys
from dataclasses import replace
from pathlib import Path

from par.app.bench import run_bench
from par.app.profile import Profile

REPO = Path(__file__).resolve().parent.parent

PATCH_TRIGGERS = {"random", "badnet_rs", "badclip"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default=str(REPO / "configs/bench.yaml"))
    parser.add_argument("--out", default=str(REPO / "runs/bench"), help="the benchmark's folder: its cells are reused")
    parser.add_argument("--seeds", default="0", help="comma-separated cleaning seeds")
    parser.add_argument("--attacks", help="comma-separated subset (default: the profile's)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    seeds = [int(s) for s in args.seeds.split(",")]
    profile = replace(Profile.load(args.config), seeds=seeds, sweeps={}, synthetic_cleaning=None, robust=None)
    attacks = args.attacks.split(",") if args.attacks else None
    run_bench(profile, str(out), attacks=attacks, defenses=["eftclip"], report="eftclip")
    rows = [r for r in csv.DictReader((out / "eftclip.csv").open()) if r["status"] == "ok"]
    others = list(csv.DictReader((out / "results.csv").open())) if (out / "results.csv").exists() else []

    def mean(found, key):
        values = [float(r[key]) for r in found if r.get(key) not in (None, "")]
        return round(100 * statistics.mean(values), 1) if values else None

    label = profile.label
    report = []
    for attack in dict.fromkeys(r["attack"] for r in rows if r["defense"] == "eftclip"):
        mine = [r for r in rows if r["attack"] == attack and r["defense"] == "eftclip"]
        entry = {"attack": attack, "victims": sorted({r["detection_victim"] for r in mine}),
                 "victim_found": all(r["detection_victim"] == label for r in mine),
                 "auroc": round(statistics.mean(float(r["detection_auroc"]) for r in mine), 4),
                 "tpr_at_5pct_fpr": mean(mine, "detection_tpr_at_5pct_fpr"), "detection_rate": mean(mine, "detection_rate"),
                 "false_positive_rate": mean(mine, "detection_false_positive_rate"),
                 "cleaned": {"eftclip": (mean(mine, "ca"), mean(mine, "asr"))},
                 "poisoned": (mean(mine[:1], "poisoned_ca"), mean(mine[:1], "poisoned_asr"))}
        # eftclip's own cells are this run's (an older run's eftclip rows in results.csv are not)
        beside = [r for r in others if r["attack"] == attack and r["defense"] != "eftclip"]
        for defense in dict.fromkeys(r["defense"] for r in beside):
            same = [r for r in beside if r["defense"] == defense and r["status"] == "ok"
                    and r["setting"] == "default" and (defense == "never-poisoned" or int(r["seed"]) in seeds)]
            if same:
                entry["cleaned"][defense] = (mean(same, "ca"), mean(same, "asr"))
        report.append(entry)
    summary = {"seeds": seeds, "label": label, "attacks": report,
               "victim_found_for_every_attack": all(e["victim_found"] for e in report),
               "patch_triggers_auroc_at_least_0.95": {e["attack"]: e["auroc"] >= 0.95 for e in report
                                                       if e["attack"] in PATCH_TRIGGERS}}
    (out / "eftclip-measurement.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"{'attack':<12}{'victim':>10}{'AUROC':>8}{'TPR@5%':>8}{'det.':>7}{'FP':>7}   CA / ASR (mean over seeds {seeds})")
    for e in report:
        cells = "  ".join(f"{d} {ca}/{asr}" for d, (ca, asr) in e["cleaned"].items())
        print(f"{e['attack']:<12}{'/'.join(e['victims']):>10}{e['auroc']:>8.3f}{e['tpr_at_5pct_fpr']!s:>8}"
              f"{e['detection_rate']!s:>7}{e['false_positive_rate']!s:>7}   poisoned {e['poisoned'][0]}/{e['poisoned'][1]}  {cells}")
    print(f"victim '{label}' found for every attack: {summary['victim_found_for_every_attack']}; "
          f"AUROC >= 0.95 on patch triggers: {summary['patch_triggers_auroc_at_least_0.95']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
