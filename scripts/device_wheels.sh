#!/usr/bin/env bash
# Downloads into .whl/ (git-ignored through .git/info/exclude) the pure-Python wheels that a GPU machine
# without network access needs beside torch, torchvision, timm, huggingface_hub, regex, safetensors,
# pandas, scipy, pyyaml, pillow, matplotlib, typing_extensions and pytest; scripts/device_check.sh installs them from
# there. The versions pinned are the ones the test suite passes with; one set serves any Python 3.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
PY=${PY:-python3}
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any -d .whl \
    open_clip_torch==3.3.0 webdataset==1.0.2 braceexpand==0.1.7 ftfy==6.3.1 wcwidth==0.9.4 torchattacks==3.5.1 timm==1.0.31 \
    inflect==7.6.0 jaraco.functools==4.6.0 more_itertools==11.2.1 typeguard==4.6.1
ls -l .whl
du -sh .whl
