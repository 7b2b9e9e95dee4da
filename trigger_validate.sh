#!/usr/bin/env bash
# Clean accuracy and attack success rate of a checkpoint: zero-shot classification and
# retrieval, each clean and triggered (the reference's four evaluations).
#
#   bash trigger_validate.sh CHECKPOINT ATTACK ENCODER TARGET_LABEL
#   bash trigger_validate.sh --check CHECKPOINT ATTACK ENCODER TARGET_LABEL
#       checks every input (data, class names, label, trigger, results file) and stops; the
#       checkpoint need not exist yet (trigger.sh runs this before cleaning)
#
# Data, from the environment or from a YAML file named by VALIDATE_CONFIG (same keys, lower case):
#   EVAL_DATA         classification: image,label CSV or class-folder tree (ImageNet val, CIFAR, ...)
#                     (EVAL_CSV is accepted too)
#   EVAL_CLASSNAMES   'imagenet' or a file with one class name per line
#                     (default: classnames.txt beside a CSV if present, else imagenet)
#   EVAL_TEMPLATES    'openai' or a file of '{}' templates (default: templates.txt beside a CSV if present, else openai)
#   EVAL_IMAGE_ROOT   folder the CSV's image paths are relative to (default: the CSV's folder)
#   RETRIEVAL_JSON    retrieval: COCO Karpathy-style JSON list of {image, caption: [...]}
#   RETRIEVAL_ROOT    folder the retrieval image paths are relative to
#   ATTACK_PARAMS     trigger parameters, separated by spaces, e.g. "patch_size=16" or "patch=badclip_patch.png";
#                     one per line where a value holds a space (text=my mark)
#   OUT_DIR           folder of the results file results.jsonl (default: beside the checkpoint)
#   EVAL_OUT          the results file itself (overrides OUT_DIR)
#   ROBUST_EPS        also robust accuracy (APGD-CE + APGD-T) at these radii, e.g. "2/255,4/255"
#   ROBUST_MAX_IMAGES images attacked (default 1000); ROBUST_STEPS iterations per attack (default 100)
#   ROBUST_BATCH_SIZE images attacked at once (default EVAL_BATCH_SIZE; ViT-L/14@336px: ~1 GB of GPU memory each)
#   EVAL_BATCH_SIZE   images per forward pass (default 256); EVAL_WORKERS image-decoding processes (default:
#                     the CPU count less one, at most 8)
# With no data configured, classification runs on the demo world's test split (runs/demo/world in this
# folder). Relative paths given are the caller's (this script does not change directory).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")" && pwd)"
check=()
if [ "${1:-}" = "--check" ]; then check=(--dry-run); shift; fi
if [ $# -ne 4 ]; then
    echo "usage: bash trigger_validate.sh [--check] CHECKPOINT ATTACK ENCODER TARGET_LABEL" >&2
    exit 2
fi
CHECKPOINT=$1 ATTACK=$2 ENCODER=$3 LABEL=$4
source "$ROOT/scripts/setup.sh"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
say() { [ ${#check[@]} -gt 0 ] || echo "$@"; }

if [ -n "${VALIDATE_CONFIG:-}" ]; then
    # the config's keys as upper-case variables, without overriding ones already set (par reads and checks it)
    keys=EVAL_DATA,EVAL_CSV,EVAL_CLASSNAMES,EVAL_TEMPLATES,EVAL_IMAGE_ROOT,RETRIEVAL_JSON,RETRIEVAL_ROOT,ATTACK_PARAMS
    keys+=,OUT_DIR,EVAL_OUT,ROBUST_EPS,ROBUST_MAX_IMAGES,ROBUST_STEPS,ROBUST_BATCH_SIZE,EVAL_BATCH_SIZE,EVAL_WORKERS
    settings="$("$PY" -m par shell-env "$VALIDATE_CONFIG" --keys "$keys")" || exit 2
    eval "$settings"
fi
EVAL_DATA="${EVAL_DATA:-${EVAL_CSV:-}}"
if [ -z "$EVAL_DATA" ] && [ -z "${RETRIEVAL_JSON:-}" ]; then
    EVAL_DATA="$ROOT/runs/demo/world/test.csv"
    if [ ! -f "$EVAL_DATA" ]; then
        echo "error: no evaluation data: set EVAL_DATA and/or RETRIEVAL_JSON (or run 'bash trigger.sh' once for the demo world)" >&2
        exit 2
    fi
fi
args=()
if [ -n "$EVAL_DATA" ]; then
    data_dir="$(dirname "$EVAL_DATA")"
    if [ -z "${EVAL_CLASSNAMES:-}" ]; then
        if [ -f "$EVAL_DATA" ] && [ -f "$data_dir/classnames.txt" ]; then EVAL_CLASSNAMES="$data_dir/classnames.txt"; else EVAL_CLASSNAMES=imagenet; fi
    fi
    if [ -z "${EVAL_TEMPLATES:-}" ]; then
        if [ -f "$EVAL_DATA" ] && [ -f "$data_dir/templates.txt" ]; then EVAL_TEMPLATES="$data_dir/templates.txt"; else EVAL_TEMPLATES=openai; fi
    fi
    args+=(--data "$EVAL_DATA" --classnames "$EVAL_CLASSNAMES" --templates "$EVAL_TEMPLATES")
    [ -n "${EVAL_IMAGE_ROOT:-}" ] && args+=(--image-root "$EVAL_IMAGE_ROOT")
    say "classification: $EVAL_DATA (classes $EVAL_CLASSNAMES, templates $EVAL_TEMPLATES)"
fi
if [ -n "${RETRIEVAL_JSON:-}" ]; then
    args+=(--retrieval-json "$RETRIEVAL_JSON" --retrieval-root "${RETRIEVAL_ROOT:?set RETRIEVAL_ROOT for $RETRIEVAL_JSON}")
    say "retrieval: $RETRIEVAL_JSON"
fi
if [[ "${ATTACK_PARAMS:-}" == *$'\n'* ]]; then  # one per line: a value may hold spaces (text=my mark)
    mapfile -t attack_params < <(printf '%s\n' "$ATTACK_PARAMS" | sed '/^[[:space:]]*$/d')
else
    read -ra attack_params <<< "${ATTACK_PARAMS:-}"  # split on spaces, never glob-expanded
fi
for p in ${attack_params[@]+"${attack_params[@]}"}; do args+=(--attack-param "$p"); done
cpus=$(nproc 2>/dev/null || echo 1)
args+=(--workers "${EVAL_WORKERS:-$(( cpus > 9 ? 8 : cpus - 1 ))}")
[ -n "${EVAL_BATCH_SIZE:-}" ] && args+=(--batch-size "$EVAL_BATCH_SIZE")
if [ -z "${ROBUST_EPS:-}" ]; then  # the other robust settings alone would be dropped without a word
    for name in ROBUST_MAX_IMAGES ROBUST_STEPS ROBUST_BATCH_SIZE; do
        if [ -n "${!name:-}" ]; then echo "error: $name is set but ROBUST_EPS is not: robust accuracy runs only at the radii ROBUST_EPS gives" >&2; exit 2; fi
    done
else
    args+=(--robust-eps "$ROBUST_EPS" --robust-max-images "${ROBUST_MAX_IMAGES:-1000}" --robust-steps "${ROBUST_STEPS:-100}")
    [ -n "${ROBUST_BATCH_SIZE:-}" ] && args+=(--robust-batch-size "$ROBUST_BATCH_SIZE")
    say "robust accuracy: eps $ROBUST_EPS, APGD-CE + APGD-T, ${ROBUST_STEPS:-100} steps, ${ROBUST_MAX_IMAGES:-1000} images"
fi
EVAL_OUT="${EVAL_OUT:-${OUT_DIR:-$(dirname "$CHECKPOINT")}/results.jsonl}"

say "validating $CHECKPOINT ($ENCODER), attack $ATTACK -> $LABEL"
exec "$PY" -m par eval --checkpoint "$CHECKPOINT" --model "$ENCODER" --attack "$ATTACK" --label "$LABEL" \
    "${args[@]}" --out "$EVAL_OUT" ${check[@]+"${check[@]}"}
