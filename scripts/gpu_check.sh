#!/usr/bin/env bash
# On a machine with a CUDA GPU and a CUDA torch (no network needed): build, test, sanitize and
# benchmark, writing everything to a results folder. Two stages, each under 10 minutes, so it fits
# two device calls:   make gpu-check-build   then   make gpu-check-bench   (make gpu-check: both).
#   stage "build": CUDA extension, the whole test suite on CUDA tensors (cuda + compiled triton),
#                  CMake build + ctest, compute-sanitizer memcheck/racecheck on steer_test and a
#                  small Python run.
#   stage "bench": pytest-benchmark suite, shape sweep and e2e decode (full GPU grids), report.
set -uo pipefail
cd "$(dirname "$0")/.."
STAGE=${1:?usage: scripts/gpu_check.sh build|bench}
PY=${PY:-python3}
OUT=${GPU_CHECK_OUT:-bench/results/gpu-check}
mkdir -p "$OUT"
LOG="$OUT/$STAGE.log"
: > "$LOG"
status=0
step() {  # step NAME CMD...: runs, logs, records pass/fail; later steps still run
  local name=$1; shift
  echo "=== $name: $*" | tee -a "$LOG"
  local start=$SECONDS
  if "$@" >> "$LOG" 2>&1; then r=pass; else r=FAIL; status=1; fi
  echo "=== $name: $r in $((SECONDS - start)) s" | tee -a "$LOG"
  echo "$STAGE $name $r $((SECONDS - start))s" >> "$OUT/summary.txt"
}

if [ "$STAGE" = build ]; then
  : > "$OUT/summary.txt"
  { echo "command: make gpu-check (scripts/gpu_check.sh build; scripts/gpu_check.sh bench)"
    date -u +"date: %Y-%m-%dT%H:%M:%SZ"
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | sed 's/^/gpu: /'
    nvcc --version | tail -1 | sed 's/^/nvcc: /'
    $PY -c "import torch, triton; print('torch:', torch.__version__, 'cuda', torch.version.cuda); print('triton:', triton.__version__)"
  } > "$OUT/environment.txt" 2>&1
  cat "$OUT/environment.txt"
  export MAX_JOBS=${MAX_JOBS:-16} ANCHOR_KERNELS_CUDA_ARCHS=${ANCHOR_KERNELS_CUDA_ARCHS:-90a}
  step extension $PY -m pip install --no-build-isolation --no-deps -e .
  step cuda-backend-ready $PY -c "import torch, anchor_kernels as ak; from anchor_kernels.steer import unavailable_reason as u; d=torch.device('cuda'); print({b: u(b, d) for b in ('cuda','triton')}); assert u('cuda', d) is None and u('triton', d) is None"
  step pytest $PY -m pytest -q -x --junitxml="$OUT/pytest.xml"
  step cmake cmake -S . -B build/gpu -DCMAKE_BUILD_TYPE=Release "-DANCHOR_KERNELS_CUDA_GENCODE=-gencode=arch=compute_90a,code=sm_90a"
  step cmake-build cmake --build build/gpu -j 16
  step ctest ctest --test-dir build/gpu --output-on-failure
  step memcheck-steer_test compute-sanitizer --tool memcheck --error-exitcode 1 build/gpu/steer_test
  step racecheck-steer_test compute-sanitizer --tool racecheck --error-exitcode 1 build/gpu/steer_test
  step memcheck-python compute-sanitizer --tool memcheck --error-exitcode 1 $PY scripts/gpu_smoke.py
elif [ "$STAGE" = bench ]; then
  export AK_BENCH_FULL=1
  step bench-pytest $PY -m pytest bench/ --benchmark-only --benchmark-columns=median,iqr,rounds --benchmark-json=bench/results/bench-cuda.json
  step sweep $PY bench/sweep.py
  step sweep-mean $PY bench/sweep.py --objective mean
  step e2e $PY bench/e2e_decode.py
  step report $PY bench/report.py
  cp bench/results/*cuda* "$OUT"/ 2>/dev/null
else
  echo "unknown stage $STAGE" >&2; exit 2
fi
cat "$OUT/summary.txt"
exit $status
