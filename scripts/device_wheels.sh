#!/usr/bin/env bash
# Downloads, here, the wheels the GPU machine's image lacks into .whl/ (git-ignored through
# .git/info/exclude), for `run` with carry [".whl"] and scripts/device_check.sh, which installs them.
# The image has torch, torchvision, timm, huggingface_hub, regex, safetensors, pandas, scipy, pyyaml,
# pillow, matplotlib and pytest (/work/.library/device/KINDS.md); the versions pinned are the ones
# this project's tests pass with here. Pure-Python wheels: one set serves the device's Python 3.12.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
PY=${PY:-python3}
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any -d .whl \
    open_clip_torch==3.3.0 webdataset==1.0.2 braceexpand==0.1.7 ftfy==6.3.1 wcwidth==0.9.4 torchattacks==3.5.1 timm==1.0.31
ls -l .whl
du -sh .whl
