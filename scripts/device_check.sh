#!/usr/bin/env bash
# Every GPU check of the project as one command, in stages, under a time budget:
#
#   OUT=runs/device-check bash scripts/device_check.sh [STAGE ...]
#
# Stages, in order of what they settle (default: all): env throughput tests memory encoders loader compile scan.
#   env         nvidia-smi, torch, CUDA, the carried packages
#   throughput  PAR step, ViT-B-32 @ 224, batch 256, fp32 / amp / amp_bf16 (the 40 % MFU bar) + profile
#   tests       pytest -m cuda (every CUDA-marked test)
#   memory      ViT-L-14-336 PAR at batch 512, amp_bf16 + gradient checkpointing: peak memory
#   encoders    RN50 (batch 256) and ViT-L-14-336 (batch 64) PAR steps, amp_bf16
#   loader      decoded images/s from JPEG shards and CSV, 1 and 12 workers, beside the best step rate
#   compile     the same PAR step under torch.compile, amp_bf16
#   scan        one ViT-B-32 checkpoint scan over ImageNet's 1,000 class names on 500 images, timed beside
#               its estimate (scripts/scan_cost.py --run; random weights and images, in /tmp/scan-run)
# The budget DEVICE_CHECK_BUDGET_S (default 470 s) counts from the start, the wheel install included; each
# stage runs under its own cap (CAP below) within what is left, and one that would start with less than it
# needs (30 s; the scan 120 s) is skipped and named in summary.md, so a call limited to 10 minutes returns
# with what it measured and the summary; run the skipped stages in a second call. Everything lands in $OUT (default runs/device-check; eight files): device_check.log,
# env.txt, cuda_tests.log, train_throughput.jsonl, loader_throughput.jsonl, profile.txt, scan_cost.json,
# summary.md.
#
# On a GPU machine without network access whose Python has torch and torchvision only: wheels of the
# other dependencies downloaded beforehand into .whl (scripts/device_wheels.sh) are installed from there
# into /tmp/site. DEVICE_CHECK_DRY=1 runs every stage on the CPU with a micro model
# and tiny sizes (tests/test_scripts.py does), to check this script without a GPU.
set -uo pipefail
START=$SECONDS  # before anything: the install counts against the budget too
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/device-check}
mkdir -p "$OUT"
BUDGET=${DEVICE_CHECK_BUDGET_S:-470}
PY=${PY:-python3}
export PYTHONUNBUFFERED=1
exec > >(tee -a "$OUT/device_check.log") 2>&1

if [[ ${DEVICE_CHECK_DRY:-0} == 1 ]]; then
    DEV=cpu; B32=par-micro-vit; RN=par-micro-vit; L14=par-micro-vit; BATCH=8; MID=8; BIG=8; STEPS=2; WARM=1
    JPEGS=24; JPEG_PX=40; PX=32; WORKERS="0 1"
    SCAN_LABELS=30; SCAN_IMAGES=8; SCAN_EXTRA="--timing-images 4 --timing-steps 1 --scanner-param steps=2
        --scanner-param rank_steps=1 --scanner-param refine_steps=2"
    TESTS="env PAR_CUDA_TESTS_DEVICE=cpu $PY -m pytest -q -m cuda --collect-only -p no:cacheprovider tests/test_cuda.py"
else
    DEV=cuda; B32=ViT-B-32; RN=RN50; L14=ViT-L-14-336; BATCH=256; MID=64; BIG=512; STEPS=20; WARM=5
    JPEGS=4000; JPEG_PX=400; PX=224; WORKERS="1 12"
    SCAN_LABELS=1000; SCAN_IMAGES=500; SCAN_EXTRA=""
    TESTS="$PY -m pytest -q -rA -m cuda -p no:cacheprovider tests/test_cuda.py"
    if [[ -d .whl ]]; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl || { echo "wheel install failed"; exit 1; }
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    "$PY" -c "import torch, open_clip, open_clip_train, webdataset, braceexpand, torchattacks, safetensors, inflect" || {
        echo "missing dependencies: carry .whl (bash scripts/device_wheels.sh makes it)"; exit 1; }
fi
TRAIN="$PY scripts/train_throughput.py --device $DEV --out $OUT/train_throughput.jsonl --steps $STEPS --warmup $WARM"
DONE=(); SKIPPED=(); FAILED=()
declare -A CAP=([env]=30 [throughput]=150 [tests]=210 [memory]=90 [encoders]=120 [loader]=120 [compile]=150 [scan]=600)
declare -A NEED=([scan]=120)  # seconds a stage needs left to be worth starting (default 30)

stage_env() {
    { date -u; nvidia-smi 2>&1 | head -15
      "$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda',
torch.version.cuda, 'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
      "$PY" -m pip list 2>/dev/null | grep -i -E "open.clip|webdataset|torchattacks|^torch|timm|ftfy|pillow"
    } > "$OUT/env.txt" 2>&1
    cat "$OUT/env.txt"
}
stage_throughput() { $TRAIN --model $B32 --batch $BATCH --precision fp32 amp amp_bf16 --profile "$OUT/profile.txt"; }
# tee ignores the stop signal, so the log keeps what pytest prints as it is interrupted
stage_tests() { $TESTS 2>&1 | (trap '' INT TERM; exec tee "$OUT/cuda_tests.log"); }
stage_compile() { $TRAIN --model $B32 --batch $BATCH --precision amp_bf16 --compile; }
stage_loader() {  # beside the step rate when this call measured one
    local rate=(); [[ -s $OUT/train_throughput.jsonl ]] && rate=(--step-rate "$OUT/train_throughput.jsonl")
    "$PY" scripts/loader_throughput.py --make-jpegs $JPEGS --jpeg-size $JPEG_PX --size $PX --model $B32 \
        --batch $BATCH --workers $WORKERS --batches 10 --warmup 2 --work /tmp/loader-bench \
        ${rate[@]+"${rate[@]}"} --out "$OUT/loader_throughput.jsonl"
}
stage_memory() { $TRAIN --model $L14 --batch $BIG --precision amp_bf16 --grad-checkpointing --steps 3 --warmup 1; }
stage_encoders() {
    $TRAIN --model $RN --batch $BATCH --precision amp_bf16 && $TRAIN --model $L14 --batch $MID --precision amp_bf16
}
stage_scan() {
    "$PY" scripts/scan_cost.py --model $B32 --labels $SCAN_LABELS --images $SCAN_IMAGES --device $DEV $SCAN_EXTRA \
        --run /tmp/scan-run --out "$OUT/scan_cost.json"
}

STAGES=("$@")
[[ ${#STAGES[@]} -eq 0 ]] && STAGES=(env throughput tests memory encoders loader compile scan)
for stage in "${STAGES[@]}"; do
    if ! declare -F "stage_$stage" > /dev/null; then
        echo "unknown stage '$stage'; known: env throughput tests memory encoders loader compile scan"; exit 2
    fi
done
export -f stage_env stage_throughput stage_tests stage_compile stage_loader stage_memory stage_encoders stage_scan
export OUT PY DEV B32 RN L14 BATCH MID BIG STEPS WARM JPEGS JPEG_PX PX WORKERS TRAIN TESTS SCAN_LABELS SCAN_IMAGES \
    SCAN_EXTRA
for stage in "${STAGES[@]}"; do
    left=$((BUDGET - (SECONDS - START)))
    if ((left < ${NEED[$stage]:-30})); then
        SKIPPED+=("$stage"); echo "== $stage: skipped, ${left}s of the budget left"; continue
    fi
    limit=$((left < CAP[$stage] ? left : CAP[$stage]))
    echo "== $stage (at $((SECONDS - START)) s, at most ${limit} s)"
    # SIGINT to the stage's whole process group: pytest still prints what ran, a script its traceback;
    # SIGKILL 5 s later (where SIGINT is ignored, as in a background job)
    timeout --signal=INT --kill-after=5 "$limit" bash -c "set -o pipefail; stage_$stage"; rc=$?
    if ((rc == 0)); then DONE+=("$stage"); else FAILED+=("$stage (exit $rc)"); fi
    echo "== $stage: exit $rc after $((SECONDS - START)) s"
done

{
    echo "# device check, $(date -u +%F) ($((SECONDS - START)) s)"
    echo; echo "done: ${DONE[*]:-none}; failed: ${FAILED[*]:-none}; skipped (run again with these): ${SKIPPED[*]:-none}"
    echo; "$PY" scripts/throughput_table.py --train "$OUT/train_throughput.jsonl" --loader "$OUT/loader_throughput.jsonl"
    [[ -f $OUT/cuda_tests.log ]] && { echo; echo "CUDA tests: $(tail -1 "$OUT/cuda_tests.log")"; }
    [[ -f $OUT/scan_cost.json ]] && { echo; grep -ho "one real scan .*" "$OUT/device_check.log" | tail -1; }
} > "$OUT/summary.md" 2>&1
cat "$OUT/summary.md"
((${#FAILED[@]} == 0))
