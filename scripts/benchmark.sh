#!/usr/bin/env bash
# The whole benchmark, one profile after another into one folder: bash scripts/benchmark.sh [--quick] [--out DIR] [--jobs N]
#   bench.yaml            the main matrix, the never-poisoned floor and the scan table  -> results.md, scan.md
#   bench-scan.yaml       the three scanners on the main matrix's models            -> scanners.md
#   bench-fare.yaml       FARE beside PAR and FT, robust zero-shot accuracy              -> fare.md
#   bench-eftclip.yaml    EftCLIP (detection in the poisoned training set)               -> eftclip.md
#   bench-tau.yaml        PAR's tau swept on three attacks                               -> tau.md, tau-tradeoff.png
#   bench-synthetic.yaml  PAR cleaned with pairs of a world of another style             -> synthetic.md
# Re-running resumes: finished cells, models, scans and evaluations are reused, also across profiles.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
out=runs/bench
args=()
scan_args=()  # what the scan table takes of them: --quick, --attacks, --jobs
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --out=*) out="${1#--out=}"; shift ;;
    --quick) args+=("$1"); scan_args+=("$1"); shift ;;
    --attacks) args+=("$1" "$2"); scan_args+=("$1" "$2"); shift 2 ;;
    --attacks=*) args+=("$1"); scan_args+=("$1"); shift ;;
    --jobs) args+=("$1" "$2"); scan_args+=("$1" "$2"); shift 2 ;;
    --jobs=*) args+=("$1"); scan_args+=("$1"); shift ;;
    --config|--config=*|--report|--report=*)  # each part has its own: one given here would replace them all
      echo "error: benchmark.sh runs each profile into its own report; run 'python -m par bench --config FILE" \
           "--report NAME' for one" >&2; exit 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
failed=()  # a part with failed cells writes its tables and exits non-zero: the others still run, the end says so
part() { "$@" || failed+=("$(printf '%q ' "$@")"); }
part "$PY" -m par bench --config configs/bench.yaml --out "$out" ${args[@]+"${args[@]}"}
part "$PY" scripts/scan_benchmark.py --config configs/bench-scan.yaml --out "$out" --report scanners \
  ${scan_args[@]+"${scan_args[@]}"}
for side in fare eftclip tau synthetic; do
  part "$PY" -m par bench --config "configs/bench-$side.yaml" --out "$out" --report "$side" ${args[@]+"${args[@]}"}
done
if [ ${#failed[@]} -gt 0 ]; then
  printf 'error: %s part(s) of the benchmark failed (their errors are above and in their tables):\n' "${#failed[@]}" >&2
  printf '  %s\n' "${failed[@]}" >&2
  exit 1
fi
