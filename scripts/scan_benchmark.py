"""The scan table alone: every scanner of a profile's ``scan`` part on its poisoned models and clean controls.

    python scripts/scan_benchmark.py [--config configs/micro-scan.yaml] [--out runs/micro-scan] [--attacks a,b]
                                     [--report scan] [--quick] [--jobs N]

Builds (or reuses) the poisoned models and the clean controls, scans each, and writes ``<report>.csv`` and
``<report>.md`` (AUROC, TPR / FPR at the threshold, target named, seconds per scan). ``python -m par bench``
writes the same table (``scan.csv/.md``) beside its results when its profile has a ``scan`` part.
"""
import argparse
import sys

from par.app.scanbench import run_scan_bench
from par.errors import ParError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/micro-scan.yaml")
    parser.add_argument("--out", default="runs/micro-scan")
    parser.add_argument("--attacks", help="comma-separated subset (default: the profile's attacks)")
    parser.add_argument("--report", default="scan", help="stem of the tables' files (default scan)")
    parser.add_argument("--quick", action="store_true", help="the profile's quick variant")
    parser.add_argument("--jobs", type=int, help="models trained at once, each a process of one thread (default: the "
                                                 "profile's jobs, 1): the models `python -m par bench --jobs` trains")
    args = parser.parse_args(argv)
    try:
        out = run_scan_bench(args.config, args.out, args.attacks.split(",") if args.attacks else None,
                             report=args.report, quick=args.quick, jobs=args.jobs)
    except ParError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print((out / f"{args.report}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
