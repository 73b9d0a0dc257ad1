#!/usr/bin/env bash
# One command that produces everything the GPU benchmark issue needs, into
# benchmarks/results/ (or $OUT_DIR):
#
#   1. check    fused vs torchvision agreement on the GPU: resnet50 fp64 (exact) and bf16
#               (against a torchvision fp64 reference), for every available backend
#               -> check_<model>_<dtype>_<backend>_<device>.json
#   2. bench    python -m fused_resnet bench --suite gpu: resnet50 + resnet152, 224x224,
#               batch 256 and 128, train and infer; eager (fp32), eager-cl-amp, compile,
#               compile-max-autotune, fused and every available fused-<backend>
#               -> bench_<model>_<mode>_b<batch>_<device>.json/.png, suite_<device>.json/.md
#   3. profile  benchmarks/profile_step.py: where one training step's time goes
#               -> profile_<device>.json/.md
#   and the whole log -> gpu_suite_<device>.log
#
# usage: benchmarks/gpu_suite.sh [--tiny] [more arguments for `bench --suite gpu`]
#   --tiny (or FUSED_RESNET_TINY=1): the same steps on CPU at toy size, in about a minute.
#   STEPS="check bench profile" selects steps; PYTHON picks the interpreter; OUT_DIR the
#   output directory. Extra arguments narrow the bench matrix, e.g.
#     benchmarks/gpu_suite.sh --model resnet50 --batch 256 --skip-existing
# Exit status: 0 when every step succeeded, else the number of failed steps.
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT_DIR=${OUT_DIR:-benchmarks/results}
STEPS=${STEPS:-check bench profile}

TINY=0
case "${FUSED_RESNET_TINY:-0}" in ""|0) ;; *) TINY=1 ;; esac
BENCH_ARGS=()
for arg in "$@"; do
  if [ "$arg" = "--tiny" ]; then TINY=1; else BENCH_ARGS+=("$arg"); fi
done

if [ "$TINY" = 1 ]; then
  DEVICE=cpu; TAG=cpu_tiny; TINY_FLAG=(--tiny)
  CHECK_SIZE=(--model resnet18 --resolution 32 --batch 2 --device cpu)
  CHECK_DTYPES="fp64"
else
  DEVICE=$("$PYTHON" -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
  TAG=$DEVICE; TINY_FLAG=()
  CHECK_SIZE=(--model resnet50 --device "$DEVICE")
  CHECK_DTYPES="fp64 bf16"
  if [ "$DEVICE" != cuda ]; then
    echo "gpu_suite.sh: no CUDA device; use --tiny to try the code path on CPU" >&2
    exit 2
  fi
fi
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_suite_${TAG}.log"
: > "$LOG"
FAILED=0

run() {  # run a command, echo it, log its output, count failures
  echo "+ $*" | tee -a "$LOG"
  "$@" 2>&1 | tee -a "$LOG"
  local status=${PIPESTATUS[0]}
  if [ "$status" != 0 ]; then
    echo "gpu_suite.sh: FAILED (exit $status): $*" | tee -a "$LOG"
    FAILED=$((FAILED + 1))
  fi
}

echo "gpu_suite.sh: device $DEVICE, steps: $STEPS, results in $OUT_DIR" | tee -a "$LOG"
"$PYTHON" -c "import torch, fused_resnet; print('torch', torch.__version__, 'cuda',
torch.version.cuda, 'backends', fused_resnet.available_backends())" 2>&1 | tee -a "$LOG"

for step in $STEPS; do
  case $step in
    check)
      BACKENDS=$("$PYTHON" -W ignore -c "
import torch, fused_resnet
from fused_resnet.tools.bench import backend_status
print(' '.join(b for b in fused_resnet.available_backends()
               if backend_status(b, torch.device('$DEVICE'))[1] is None))")
      for backend in $BACKENDS; do
        for dtype in $CHECK_DTYPES; do
          run "$PYTHON" -m fused_resnet check "${CHECK_SIZE[@]}" --dtype "$dtype" \
            --backend "$backend" --channels-last --no-progress \
            --json "$OUT_DIR/check_${CHECK_SIZE[1]}_${dtype}_${backend}_${TAG}.json"
        done
      done ;;
    bench)
      run "$PYTHON" -m fused_resnet bench --suite gpu "${TINY_FLAG[@]}" --out "$OUT_DIR" \
        ${BENCH_ARGS[@]+"${BENCH_ARGS[@]}"} ;;
    profile)
      run "$PYTHON" benchmarks/profile_step.py "${TINY_FLAG[@]}" --out-dir "$OUT_DIR" ;;
    *)
      echo "gpu_suite.sh: unknown step '$step' (expected check, bench, profile)" >&2
      FAILED=$((FAILED + 1)) ;;
  esac
done

echo "gpu_suite.sh: done, $FAILED failed step(s); log: $LOG" | tee -a "$LOG"
exit "$FAILED"
