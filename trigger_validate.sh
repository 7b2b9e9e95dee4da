#!/usr/bin/env bash
# Zero-shot clean accuracy and attack success rate of a checkpoint.
#
#   bash trigger_validate.sh CHECKPOINT ATTACK ENCODER TARGET_LABEL
#
# Evaluation data (environment; default: the demo world's test split, runs/demo/world):
#   EVAL_CSV          image,label CSV (label = index into the class names)
#   EVAL_CLASSNAMES   class names, one per line (default: classnames.txt beside EVAL_CSV)
#   EVAL_TEMPLATES    'openai' or a file of '{}' templates (default: templates.txt beside EVAL_CSV if present, else openai)
#   EVAL_IMAGE_ROOT   folder the CSV's image paths are relative to (default: the CSV's folder)
#   ATTACK_PARAMS     trigger parameters, e.g. "patch_size=16"
#   EVAL_OUT          JSON results file (default: eval-ATTACK-LABEL.json beside the checkpoint)
set -euo pipefail
cd "$(dirname "$0")"
if [ $# -ne 4 ]; then
    echo "usage: bash trigger_validate.sh CHECKPOINT ATTACK ENCODER TARGET_LABEL" >&2
    exit 2
fi
CHECKPOINT=$1 ATTACK=$2 ENCODER=$3 LABEL=$4
source scripts/setup.sh

EVAL_CSV="${EVAL_CSV:-runs/demo/world/test.csv}"
if [ ! -f "$EVAL_CSV" ]; then
    echo "error: evaluation CSV $EVAL_CSV not found; set EVAL_CSV (or run 'bash trigger.sh' once for the demo world)" >&2
    exit 2
fi
data_dir="$(dirname "$EVAL_CSV")"
EVAL_CLASSNAMES="${EVAL_CLASSNAMES:-$data_dir/classnames.txt}"
if [ -z "${EVAL_TEMPLATES:-}" ]; then
    if [ -f "$data_dir/templates.txt" ]; then EVAL_TEMPLATES="$data_dir/templates.txt"; else EVAL_TEMPLATES=openai; fi
fi
EVAL_OUT="${EVAL_OUT:-$(dirname "$CHECKPOINT")/eval-$ATTACK-$LABEL.json}"
params=()
for p in ${ATTACK_PARAMS:-}; do params+=(--attack-param "$p"); done

echo "validating $CHECKPOINT ($ENCODER) on $EVAL_CSV, attack $ATTACK -> $LABEL, templates $EVAL_TEMPLATES"
"$PY" -m par eval --checkpoint "$CHECKPOINT" --model "$ENCODER" --data "$EVAL_CSV" --classnames "$EVAL_CLASSNAMES" \
    --templates "$EVAL_TEMPLATES" ${EVAL_IMAGE_ROOT:+--image-root "$EVAL_IMAGE_ROOT"} \
    --attack "$ATTACK" --label "$LABEL" "${params[@]}" --out "$EVAL_OUT"
echo "results: $EVAL_OUT"
