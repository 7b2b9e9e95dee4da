"""Measures FARE on the synthetic world beside PAR, FT and CleanCLIP: does its robust accuracy reach half
its clean accuracy, and how much clean accuracy does it cost against the poisoned model?

    python scripts/measure_fare.py [--config configs/bench.yaml] [--out runs/bench] [--attack badnet_rs]
                                   [--steps 100] [--max-images 1000] [--eps 2/255,4/255]

Cleans one poisoned model (the benchmark's, reused from --out when it is there) with each defense
at the first seed, then measures robust zero-shot accuracy of the poisoned, never-poisoned and
cleaned models with APGD-CE + APGD-T at the field's budget (100 steps, 1,000 images), and with a
10-step PGD as the sanity baseline APGD must beat. Writes <out>/fare-robust.{csv,md} (through the
benchmark, so its cells are shared, its report untouched) and <out>/fare-measurement.json; prints
the summary. Exits 1 if APGD is weaker than PGD anywhere (a broken attack), never for a missed aim.
"""
import argparse
import csv
import json
import sys
from dataclasses import replace
from pathlib import Path

from par.app.bench import run_bench
from par.app.profile import Profile, Robust
from par.eval.robust import eps_label, parse_eps

REPO = Path(__file__).resolve().parent.parent

DEFENSES = ["ft", "par", "cleanclip", "fare"]
# RobustVLM README (github.com/chs20/RobustVLM, commit 2a5ec14): ViT-L/14, average zero-shot accuracy
# over its datasets, clean / eps 2/255 / eps 4/255, APGD-CE + APGD-T at 100 iterations
ANCHORS = {"OpenAI CLIP": (73.1, 0.0, 0.0), "TeCoA^2": (60.0, 43.6, 27.0), "FARE^2": (67.0, 43.1, 20.5),
           "TeCoA^4": (54.2, 42.3, 31.9), "FARE^4": (61.1, 45.9, 32.4)}


def bench(profile: Profile, out: Path, attack: str, report: str) -> list:
    run_bench(profile, str(out), attacks=[attack], defenses=DEFENSES, report=report)
    return list(csv.DictReader((out / f"{report}.csv").open()))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default=str(REPO / "configs/bench.yaml"))
    parser.add_argument("--out", default=str(REPO / "runs/bench"), help="the benchmark's folder: its cells are reused")
    parser.add_argument("--attack", default="badnet_rs")
    parser.add_argument("--eps", default="2/255,4/255")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--max-images", type=int, default=1000)
    args = parser.parse_args(argv)
    out = Path(args.out)
    eps = [eps_label(parse_eps(e)) for e in args.eps.split(",")]
    profile = Profile.load(args.config)
    profile = replace(profile, seeds=(profile.seeds or [0])[:1], sweeps={}, synthetic_cleaning=None)
    apgd = bench(replace(profile, robust=Robust(eps=eps, steps=args.steps, max_images=args.max_images,
                                                attacks=["apgd-ce", "apgd-t"])), out, args.attack, "fare-robust")
    pgd = bench(replace(profile, robust=Robust(eps=eps, steps=10, max_images=args.max_images, attacks=["pgd"])),
                out, args.attack, "fare-robust-pgd10")
    pgd_by_model = {r["defense"]: r for r in pgd}

    models = [("poisoned", apgd[0], "poisoned_", pgd[0])] + [
        (r["defense"], r, "", pgd_by_model[r["defense"]]) for r in apgd]
    table, sane = [], True
    for name, row, prefix, pgd_row in models:  # prefix: the poisoned model's columns, or the row's own model
        ca = float(row[f"{prefix}ca"])
        entry = {"model": name, "clean_accuracy": ca}
        for e in eps:
            entry[f"apgd@{e}"] = float(row[f"{prefix}robust@{e}"])
            entry[f"pgd10@{e}"] = float(pgd_row[f"{prefix}robust@{e}"])
            sane &= entry[f"apgd@{e}"] <= entry[f"pgd10@{e}"] + 1e-9
        table.append(entry)
    poisoned_ca = table[0]["clean_accuracy"]
    fare = next(t for t in table if t["model"] == "fare")
    last = eps[-1]
    summary = {
        "attack": args.attack, "eps": eps, "apgd_steps": args.steps, "images": args.max_images, "models": table,
        "fare_robust_at_least_half_its_clean_accuracy": fare[f"apgd@{last}"] >= fare["clean_accuracy"] / 2,
        "fare_clean_accuracy_cost_points": round(100 * (poisoned_ca - fare["clean_accuracy"]), 1),
        "apgd_not_weaker_than_pgd10_everywhere": sane, "anchors_robustvlm_vit_l14": ANCHORS,
    }
    (out / "fare-measurement.json").write_text(json.dumps(summary, indent=2) + "\n")
    header = f"{'model':<16}{'CA':>7}" + "".join(f"{'APGD ' + e:>14}{'PGD-10 ' + e:>16}" for e in eps)
    print(header)
    for t in table:
        print(f"{t['model']:<16}{100 * t['clean_accuracy']:>7.1f}"
              + "".join(f"{100 * t[f'apgd@{e}']:>14.1f}{100 * t[f'pgd10@{e}']:>16.1f}" for e in eps))
    print(f"FARE robust at {last} >= half its CA: {summary['fare_robust_at_least_half_its_clean_accuracy']}; "
          f"CA cost vs poisoned: {summary['fare_clean_accuracy_cost_points']} points; "
          f"APGD <= PGD-10 everywhere: {sane}")
    print("anchors (RobustVLM README, ViT-L/14, clean / 2/255 / 4/255): "
          + "; ".join(f"{k} {' / '.join(map(str, v))}" for k, v in ANCHORS.items()))
    return 0 if sane else 1


if __name__ == "__main__":
    sys.exit(main())
