# Source me: sets PY to a Python that has par's dependencies, installing them if needed.
#   1. $PAR_PYTHON if set;
#   2. else the active python3, if it imports every dependency;
#   3. else ./.venv (created and filled from requirements.txt when missing or incomplete).
# torch, torchvision and open_clip_torch are installed together so pip picks matching
# builds: the CPU-only torch wheel cannot import the registry's (CUDA) torchvision.
# torchattacks goes in with --no-deps (requirements.txt says why).
_par_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_par_imports='import torch, torchvision, open_clip, open_clip_train, numpy, pandas, PIL, yaml, tqdm, safetensors, matplotlib, pytest, scipy, torchattacks, webdataset, braceexpand, inflect'
if [ -n "${PAR_PYTHON:-}" ]; then
    PY="$PAR_PYTHON"
elif command -v python3 >/dev/null && python3 -c "$_par_imports" 2>/dev/null; then
    PY="$(command -v python3)"
elif [ -x "$_par_root/.venv/bin/python" ] && "$_par_root/.venv/bin/python" -c "$_par_imports" 2>/dev/null; then
    PY="$_par_root/.venv/bin/python"
else
    echo "setup: installing dependencies into $_par_root/.venv (once; torch with CUDA libraries is ~5.6 GB; set PAR_PYTHON to a python of your own that has them to use it instead)" >&2
    [ -x "$_par_root/.venv/bin/python" ] || python3 -m venv "$_par_root/.venv" || return 1 2>/dev/null || exit 1
    "$_par_root/.venv/bin/python" -m pip install -q --upgrade pip >&2 &&
    "$_par_root/.venv/bin/python" -m pip install -q -r "$_par_root/requirements.txt" >&2 &&
    "$_par_root/.venv/bin/python" -m pip install -q --no-deps "torchattacks>=3.5" >&2 &&
    "$_par_root/.venv/bin/python" -m pip install -q --no-deps -e "$_par_root" >&2 ||
        { echo "setup: pip install failed" >&2; return 1 2>/dev/null || exit 1; }
    PY="$_par_root/.venv/bin/python"
fi
export PY
