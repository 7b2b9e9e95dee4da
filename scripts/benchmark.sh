#!/usr/bin/env bash
# Every attack against every defense on the synthetic world: bash scripts/benchmark.sh [--quick] [--out DIR]
# Re-running resumes: finished cells are reused. Outputs results.csv, results.md, tradeoff.png, triggers.png.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
exec "$PY" -m par bench --config "${BENCH_CONFIG:-configs/bench.yaml}" "$@"
