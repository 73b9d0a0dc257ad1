#!/usr/bin/env bash
# One entry point that sets everything up on a fresh machine, then runs a job:
#   bash run.sh bench [bench options]   the main job: python -m fused_resnet bench
#   bash run.sh test  [pytest options]  the test suite
#   bash run.sh setup                   only the set-up
# Set-up: uses the current python3 when it already has torch (e.g. the GPU machine:
# preinstalled torch, no network), else creates .venv with torch==2.14.1 and
# torchvision==0.29.1 from PyPI; then builds fused_resnet._C (CPU kernels, and the
# CUDA kernels when a CUDA toolkit is present) as an editable install. Rebuilds only
# when csrc/, setup.py or the torch version changed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
job=${1:-bench}
[ $# -gt 0 ] && shift

PY=${PYTHON:-python3}
if ! "$PY" -c "import torch, torchvision" >/dev/null 2>&1; then
    if [ ! -x .venv/bin/python ]; then
        echo "[setup] creating .venv"
        "$PY" -m venv --system-site-packages .venv
    fi
    PY=$PWD/.venv/bin/python
    if ! "$PY" -c "import torch, torchvision" >/dev/null 2>&1; then
        echo "[setup] installing torch==2.14.1 torchvision==0.29.1 (CUDA 13.0 build)"
        "$PY" -m pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
    fi
fi
missing=$("$PY" - <<'PYEOF'
import importlib.util as u
need = {"tqdm": "tqdm", "matplotlib": "matplotlib", "pytest": "pytest", "ninja": "ninja",
        "setuptools": "setuptools", "sklearn": "scikit-learn"}
print(" ".join(pkg for mod, pkg in need.items() if u.find_spec(mod) is None))
PYEOF
)
if [ -n "$missing" ]; then
    echo "[setup] installing $missing"
    "$PY" -m pip install -q --disable-pip-version-check $missing
fi

stamp_dir=build
mkdir -p "$stamp_dir"
stamp=$( (cat setup.py; find csrc -type f | sort | xargs cat; "$PY" -c "import torch; print(torch.__version__)";
          echo "${FUSED_RESNET_CUDA:-auto}" ) | sha1sum | cut -c1-16)
if [ "$(cat "$stamp_dir/.build-stamp" 2>/dev/null)" != "$stamp" ] || \
   ! (cd /tmp && "$PY" -c "import fused_resnet._C, fused_resnet.kernels") >/dev/null 2>&1; then
    echo "[setup] building fused_resnet (CUDA: ${FUSED_RESNET_CUDA:-auto}); this takes a few minutes"
    start=$(date +%s)
    "$PY" -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
    echo "$stamp" > "$stamp_dir/.build-stamp"
    echo "[setup] built in $(( $(date +%s) - start )) s"
fi

case "$job" in
    setup) ;;
    bench) exec "$PY" -m fused_resnet bench "$@" ;;
    test)  exec "$PY" -m pytest -q tests "$@" ;;
    *)     exec "$PY" -m fused_resnet "$job" "$@" ;;
esac
