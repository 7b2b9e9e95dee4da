"""Checks the inversion defenses against their quality bar, from a benchmark's results.csv.

* on the ``--hard`` attacks (default: Blended-Triangles and BadCLIP, the two PAR leaves in): ``invert`` or
  ``par+invert`` reaches ASR <= the never-poisoned floor + 1 point, at CA no more than 2 points below the
  poisoned model;
* on every other attack: ASR no more than 1 point above PAR's, CA at least PAR's.

Means over the cleaning seeds of each cell (top-1, in %). One line per attack and defense, then the
verdict; exit status 0 whether the bar is met or not (it reports, it does not gate).

    python scripts/invert_quality.py [runs/bench/results.csv] [--hard tri_patt badclip] [--out FILE.json]
"""
import argparse
import csv
import json
import statistics
import sys
from pathlib import Path

DEFENSES = ("invert", "par+invert")


def _means(rows, attack, defense, key):
    values = [float(r[key]) for r in rows if r["attack"] == attack and r["defense"] == defense
              and r["setting"] == "default" and r["status"] == "ok" and r.get(key) not in (None, "")]
    return 100 * statistics.mean(values) if values else None


def check(rows, hard):
    """One record per attack and inversion defense: its CA / ASR, what it is held to, and whether it passes."""
    records = []
    for attack in dict.fromkeys(r["attack"] for r in rows):
        poisoned = [float(r["poisoned_ca"]) * 100 for r in rows if r["attack"] == attack and r["poisoned_ca"]]
        floor = _means(rows, attack, "never-poisoned", "asr")
        par_asr, par_ca = _means(rows, attack, "par", "asr"), _means(rows, attack, "par", "ca")
        for defense in DEFENSES:
            ca, asr = _means(rows, attack, defense, "ca"), _means(rows, attack, defense, "asr")
            if ca is None:
                continue
            if attack in hard:
                if floor is None or not poisoned:
                    raise SystemExit(f"error: {attack} needs the never-poisoned floor and the poisoned CA in the results")
                asr_bar, ca_bar, against = floor + 1, poisoned[0] - 2, "floor + 1 / poisoned CA - 2"
            else:
                if par_asr is None:
                    raise SystemExit(f"error: {attack} needs PAR's cells in the results")
                asr_bar, ca_bar, against = par_asr + 1, par_ca, "PAR's ASR + 1 / PAR's CA"
            records.append({"attack": attack, "defense": defense, "ca": ca, "asr": asr, "asr_bar": asr_bar,
                            "ca_bar": ca_bar, "against": against,
                            "passes": asr <= asr_bar + 1e-9 and ca >= ca_bar - 1e-9})
    return records


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="?", default="runs/bench/results.csv")
    parser.add_argument("--hard", nargs="+", default=["tri_patt", "badclip"],
                        help="attacks held to the never-poisoned floor rather than to PAR")
    parser.add_argument("--out", help="also write the records as JSON")
    args = parser.parse_args(argv)
    path = Path(args.results)
    if not path.is_file():
        print(f"error: no results file {path}", file=sys.stderr)
        return 2
    rows = list(csv.DictReader(path.open()))
    records = check(rows, set(args.hard))
    if not records:
        print(f"error: {path} has no {' or '.join(DEFENSES)} cells", file=sys.stderr)
        return 2
    print("| attack | defense | CA | ASR | held to (ASR <= / CA >=) | passes |")
    print("|---|---|---|---|---|---|")
    for r in records:
        print(f"| {r['attack']} | {r['defense']} | {r['ca']:.1f} | {r['asr']:.1f} | {r['asr_bar']:.1f} / "
              f"{r['ca_bar']:.1f} ({r['against']}) | {'yes' if r['passes'] else 'no'} |")
    attacks = list(dict.fromkeys(r["attack"] for r in records))
    met = [a for a in attacks if any(r["passes"] for r in records if r["attack"] == a)]
    print(f"\nbar met on {len(met)} of {len(attacks)} attacks (by invert or par+invert)"
          + (f"; missed: {', '.join(a for a in attacks if a not in met)}" if len(met) < len(attacks) else ""))
    if args.out:
        Path(args.out).write_text(json.dumps(records, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
