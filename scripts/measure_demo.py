"""Measures the demo against the quality bar: a fresh run, then a run that reuses the poisoned model.

    python scripts/measure_demo.py [--out runs/measure-demo] [--profile configs/demo.yaml]

"Fresh" is a new output folder: the world and the clean foundation come from the profile's shared
``cache`` (trained once, ~15 min on 2 cores, by the first demo or benchmark; the summary says whether
this run found it). Writes <out>/measurement.json and prints a summary; exits 1 if a bar is missed.
Aims: poisoned ASR >= 90 %, poisoned CA >= 50 %, PAR ASR <= 5 %, PAR CA within
3 points of the poisoned model, fresh run <= 480 s, reusing run <= 120 s.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run(out: Path, profile: str) -> tuple:
    env = dict(os.environ, OUT_DIR=str(out), DEMO_PROFILE=profile, PAR_PYTHON=os.environ.get("PAR_PYTHON", sys.executable))
    start = time.time()
    subprocess.run(["bash", "trigger.sh"], cwd=REPO, env=env, check=True)
    seconds = time.time() - start
    report = max(out.glob("cleaned-*/report.json"), key=lambda p: p.stat().st_mtime)
    return seconds, json.loads(report.read_text())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="runs/measure-demo")
    parser.add_argument("--profile", default="configs/demo.yaml")
    args = parser.parse_args(argv)
    out = (REPO / args.out).resolve()
    if out.exists():
        shutil.rmtree(out)
    cache = sorted(REPO.glob("runs/cache/foundation-*/checkpoint.pt"))
    fresh_s, fresh = run(out, args.profile)
    reuse_s, reused = run(out, args.profile)
    poisoned, cleaned = fresh["results"]["poisoned"], fresh["results"]["PAR"]
    checks = {
        "poisoned ASR >= 90%": poisoned["asr_top1"] >= 0.90,
        "poisoned CA >= 50%": poisoned["clean_top1"] >= 0.50,
        "PAR ASR <= 5%": cleaned["asr_top1"] <= 0.05,
        "PAR CA within 3 points": poisoned["clean_top1"] - cleaned["clean_top1"] <= 0.03,
        "fresh run <= 480 s": fresh_s <= 480,
        "reusing run <= 120 s": reuse_s <= 120,
    }
    result = {"fresh_seconds": round(fresh_s, 1), "reuse_seconds": round(reuse_s, 1),
              "foundation_found_in_cache": bool(cache), "fresh": fresh["results"],
              "reused": reused["results"], "checks": checks}
    (out / "measurement.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
