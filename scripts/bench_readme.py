"""Renders a benchmark's results.csv (finished or still running) into README.md between the markers
``<!-- results:start -->`` and ``<!-- results:end -->``: the mean ± std table (and the robust-accuracy and
detection tables when the run has them) and our ASRs beside the paper's (docs/PAR-NOTES.md section 8).

    python scripts/bench_readme.py [runs/bench/results.csv] [--config configs/bench.yaml] [--readme README.md]
"""
import argparse
import csv
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from par import triggers  # noqa: E402
from par.app.bench import write_markdown  # noqa: E402
from par.defenses import DEFENSES  # noqa: E402
from par.app.pipeline import robust_settings  # noqa: E402
from par.app.profile import Profile  # noqa: E402

NUMBERS = ("poisoned_ca", "poisoned_asr", "poisoned_asr_top5", "ca", "asr", "asr_top5")
# docs/PAR-NOTES.md section 8: RN50, ImageNet ASR after cleaning, per defense the paper reports
PAPER_DEFENSES = ("par", "cleanclip", "roclip")
PAPER = {"random": (6.3, 14.5, 75.1), "badnet_rs": (42.4, 62.3, 82.0), "blended": (0.0, 19.5, 1.5),
         "blended_rs": (0.1, 61.8, 7.0), "tri_patt": (10.3, 48.7, 37.1), "water_patt": (18.1, 42.4, 59.1),
         "warped": (0.0, 0.0, 2.0), "badclip": (30.4, 40.1, None)}
START, END = "<!-- results:start -->", "<!-- results:end -->"


def read_rows(path: Path) -> list:
    rows = []
    for row in csv.DictReader(path.open()):
        for key in NUMBERS:
            row[key] = float(row[key]) if row.get(key) else None
        row["seed"] = int(row["seed"])
        rows.append(row)
    return rows


def beside_the_paper(rows: list, attacks: list) -> str:
    def mean(attack, defense):
        values = [r["asr"] for r in rows if r["attack"] == attack and r["defense"] == defense
                  and r["setting"] == "default" and r["status"] == "ok"]
        return f"{100 * statistics.mean(values):.1f}" if values else "—"

    mine = [*PAPER_DEFENSES, "ft"]  # the paper's defenses, and plain fine-tuning beside them
    lines = ["| attack | " + " | ".join(f"ours: {d}" for d in mine) + " | "
             + " | ".join(f"paper RN50: {d}" for d in PAPER_DEFENSES) + " |", "|---" * (1 + len(mine) + len(PAPER_DEFENSES)) + "|"]
    for attack in attacks:
        ours = " | ".join(mean(attack, d) for d in mine)
        paper = " | ".join("—" if x is None else f"{x}" for x in PAPER[attack])
        lines.append(f"| {triggers.get_trigger(attack).paper_name} | {ours} | {paper} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("results", nargs="?", default="runs/bench/results.csv")
    parser.add_argument("--config", default="configs/bench.yaml", help="the profile the results came from")
    parser.add_argument("--readme", default=str(REPO / "README.md"))
    args = parser.parse_args(argv)
    rows = read_rows(Path(args.results))
    attacks = list(dict.fromkeys(r["attack"] for r in rows))
    order = ["never-poisoned", *DEFENSES.in_order(), *(f"{d}-synthetic" for d in DEFENSES.in_order())]
    defenses = [d for d in order if any(r["defense"] == d for r in rows)]
    defenses += sorted({r["defense"] for r in rows} - set(order))
    has_robust = any(k.startswith("robust@") and v for r in rows for k, v in r.items())
    profile = Profile.load(args.config)
    robust = robust_settings(profile.robust) if has_robust else None
    with tempfile.TemporaryDirectory() as tmp:
        write_markdown(Path(tmp) / "table.md", rows, attacks, defenses, profile.label, robust)
        table = (Path(tmp) / "table.md").read_text().strip()
    block = (table + "\n\nASR top-1 (%) after cleaning, ours (mean of the seeds above) beside the paper's RN50 on "
             "ImageNet:\n\n" + beside_the_paper(rows, attacks))
    readme = Path(args.readme).read_text()
    if START not in readme or END not in readme:
        print(f"error: {args.readme} lacks the markers {START} and {END}", file=sys.stderr)
        return 2
    i, j = readme.index(START) + len(START), readme.index(END)
    Path(args.readme).write_text(readme[:i] + "\n" + block + "\n" + readme[j:])
    print(block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
