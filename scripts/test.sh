#!/usr/bin/env bash
# The test suite: sets up dependencies when needed, then runs pytest serially.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
exec "$PY" -m pytest -q "$@"
