#!/usr/bin/env bash
# Clean a poisoned CLIP with PAR, then validate it.
#
#   bash trigger.sh                      offline demo on the synthetic world (configs/demo.yaml)
#   CHECKPOINT=poisoned.pt ENCODER=RN50 TRAIN_DATA=cc3m_250k.csv IMAGE_ROOT=/data/cc3m \
#       ATTACK=badnet_rs LABEL=banana bash trigger.sh
#
# Variables (the reference script's names are accepted too):
#   CHECKPOINT (modelPath)   poisoned checkpoint to clean; unset = demo
#   ENCODER (modeln)         open_clip name or OpenAI spelling (RN50, ViT-B/32, ViT-L/14@336px, ...)
#   TRAIN_DATA (trainData)   clean pairs to clean with: image,caption CSV, class-folder tree or shards
#   IMAGE_ROOT (imgRoot)     folder the CSV's image paths are relative to (default: the CSV's folder)
#   OUT_DIR (outDIR)         run folder (default runs/clean-<time>; demo: runs/demo; both in this folder)
#   ATTACK, LABEL            the backdoor to validate against (required with CHECKPOINT; the demo's: badnet_rs, banana)
#   DEFENSE                  registered defense (default: the one PAR_CONFIG's objective names, par for
#                            configs/par.yaml; every name `python -m par clean --help` lists)
#   PAR_CONFIG               training settings (default configs/par.yaml); extra `--key value`
#                            arguments to this script override its keys (dotted keys nest:
#                            --objective_params.tau 1.0). A settings file written for another
#                            objective than the defense's lends its budget, not its objective_params;
#                            the objective_params given as arguments apply.
#   DEMO_PROFILE             demo settings (default configs/demo.yaml)
# Validation data for a real checkpoint: see trigger_validate.sh (EVAL_CSV, EVAL_CLASSNAMES, ...).
# Relative paths given are the caller's (this script does not change directory).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")" && pwd)"
source "$ROOT/scripts/setup.sh"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

CHECKPOINT="${CHECKPOINT:-${modelPath:-}}"
ENCODER="${ENCODER:-${modeln:-}}"
TRAIN_DATA="${TRAIN_DATA:-${trainData:-}}"
IMAGE_ROOT="${IMAGE_ROOT:-${imgRoot:-}}"
OUT_DIR="${OUT_DIR:-${outDIR:-}}"
ATTACK="${ATTACK:-}"
LABEL="${LABEL:-}"

if [ -z "$CHECKPOINT" ]; then  # the demo; settings for a checkpoint given without one are a mistake, not a demo
    stray=()
    for name in ENCODER TRAIN_DATA IMAGE_ROOT; do [ -z "${!name}" ] || stray+=("$name"); done
    [ $# -eq 0 ] || stray+=("arguments ($*)")
    if [ ${#stray[@]} -gt 0 ]; then
        echo "error: ${stray[*]} given but no CHECKPOINT (modelPath): set CHECKPOINT to clean a checkpoint, or leave them out for the demo" >&2
        exit 2
    fi
    exec "$PY" -m par demo --profile "${DEMO_PROFILE:-$ROOT/configs/demo.yaml}" --out "${OUT_DIR:-$ROOT/runs/demo}" \
        ${ATTACK:+--attack "$ATTACK"} ${LABEL:+--label "$LABEL"} ${DEFENSE:+--defense "$DEFENSE"}
fi

: "${ENCODER:?set ENCODER (modeln) to the encoder of the checkpoint, e.g. RN50}"
: "${TRAIN_DATA:?set TRAIN_DATA (trainData) to clean image,caption pairs (CSV, class-folder tree or shards)}"
: "${ATTACK:?set ATTACK to the backdoor validated against (an attack name, e.g. badnet_rs)}"
: "${LABEL:?set LABEL to the target label of the backdoor (e.g. banana)}"
for arg in "$@"; do  # the arguments are training settings; these options are this script's own
    case "$arg" in
        --model|--model=*|--checkpoint|--checkpoint=*|--train-data|--train-data=*|--image-root|--image-root=*|\
        --out|--out=*|--config|--config=*|--defense|--defense=*)
            echo "error: ${arg%%=*} is set by this script (ENCODER, CHECKPOINT, TRAIN_DATA, IMAGE_ROOT, OUT_DIR, PAR_CONFIG, DEFENSE); the arguments are training settings" >&2
            exit 2 ;;
    esac
done
OUT_DIR="${OUT_DIR:-$ROOT/runs/clean-$(date +%Y%m%d-%H%M%S)}"
export OUT_DIR  # validation writes its results.jsonl here (a multi-stage defense's checkpoint lies deeper)
# the backdoor and the validation inputs are checked before the (long) cleaning, not after it
bash "$ROOT/trigger_validate.sh" --check "$OUT_DIR/checkpoint.pt" "$ATTACK" "$ENCODER" "$LABEL"
# the cleaned checkpoint is where `par clean` says it is (a multi-stage defense's last stage keeps it); its
# output is kept in a file to be read, not captured through /dev/stderr (which a redirected log would lose)
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
"$PY" -m par clean ${DEFENSE:+--defense "$DEFENSE"} --config "${PAR_CONFIG:-$ROOT/configs/par.yaml}" \
    --model "$ENCODER" --checkpoint "$CHECKPOINT" --train-data "$TRAIN_DATA" ${IMAGE_ROOT:+--image-root "$IMAGE_ROOT"} \
    --out "$OUT_DIR" "$@" | tee "$log"
cleaned="$(sed -n 's/^cleaned checkpoint ([^)]*): //p' "$log")"
[ -n "$cleaned" ] || { echo "error: par clean named no cleaned checkpoint" >&2; exit 1; }
bash "$ROOT/trigger_validate.sh" "$cleaned" "$ATTACK" "$ENCODER" "$LABEL"
