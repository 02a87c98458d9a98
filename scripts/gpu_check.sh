#!/usr/bin/env bash
# On a machine with a CUDA GPU, a CUDA torch, nvcc and compute-sanitizer (no network needed).
#
#   scripts/gpu_check.sh check   (make gpu-check): ONE call that fits 8 minutes on one H100/H200
#                                with 16 cores: sm_90a only. Steps, their expected times and their
#                                limits (the README's table):
#       environment        5 s           extension (sm_90a)   120 s (limit 200)
#       steer_test build  40 s (80)      steer_test           10 s (60)
#       memcheck smoke    45 s (75)      racecheck smoke       60 s (90)
#       GPU pytest       120 s (150)     decode timings        45 s (75)
#     Each step appends its result to $OUT/summary.txt as it ends and a step that would pass the
#     budget (GPU_CHECK_BUDGET, 450 s) is skipped, so a call cut short still returns what ran.
#   scripts/gpu_check.sh bench   (make gpu-bench): the long benchmark grid, for a later window.
set -uo pipefail
cd "$(dirname "$0")/.."
STAGE=${1:?usage: scripts/gpu_check.sh check|bench}
PY=${PY:-python3}
OUT=${GPU_CHECK_OUT:-bench/results/gpu-check}
BUDGET=${GPU_CHECK_BUDGET:-$([ "$STAGE" = check ] && echo 450 || echo 3600)}
mkdir -p "$OUT"
LOG="$OUT/$STAGE.log"
: > "$LOG"
status=0
step() {  # step NAME LIMIT CMD...: runs under a time limit, logs, records pass/FAIL/skipped
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET - SECONDS))
  if [ "$left" -lt 15 ]; then
    echo "$STAGE $name skipped (budget spent)" | tee -a "$OUT/summary.txt"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== $name (limit ${limit} s): $*" | tee -a "$LOG"
  local start=$SECONDS r
  if timeout "$limit" "$@" >> "$LOG" 2>&1; then r=pass; else r=FAIL; status=1; fi
  echo "=== $name: $r in $((SECONDS - start)) s" | tee -a "$LOG"
  echo "$STAGE $name $r $((SECONDS - start))s" >> "$OUT/summary.txt"
}

{ echo "command: make gpu-$STAGE (scripts/gpu_check.sh $STAGE)"
  date -u +"date: %Y-%m-%dT%H:%M:%SZ"
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | sed 's/^/gpu: /'
  nvcc --version | tail -1 | sed 's/^/nvcc: /'
  $PY -c "import torch, triton; print('torch:', torch.__version__, 'cuda', torch.version.cuda); print('triton:', triton.__version__)"
} > "$OUT/environment-$STAGE.txt" 2>&1
cat "$OUT/environment-$STAGE.txt"

if [ "$STAGE" = check ]; then
  : > "$OUT/summary.txt"
  export MAX_JOBS=${MAX_JOBS:-16} ANCHOR_KERNELS_CUDA_ARCHS=90a
  step extension 200 $PY -m pip install --no-build-isolation --no-deps -e .
  step steer_test-build 80 bash -c "cmake -S . -B build/gpu -DCMAKE_BUILD_TYPE=Release \
      '-DANCHOR_KERNELS_CUDA_GENCODE=-gencode=arch=compute_90a,code=sm_90a' && cmake --build build/gpu -j 16"
  step steer_test 60 build/gpu/steer_test
  # The sanitizers on the quick set (every kernel, plan and dtype; fewer shapes).
  step memcheck-smoke 75 env AK_TEST_QUICK=1 compute-sanitizer --tool memcheck --error-exitcode 1 build/gpu/steer_test
  step racecheck-smoke 90 env AK_TEST_QUICK=1 compute-sanitizer --tool racecheck --error-exitcode 1 build/gpu/steer_test
  step pytest-gpu 150 $PY -m pytest -q -x --junitxml="$OUT/pytest.xml" python_tests/test_gpu.py \
      python_tests/test_selftest.py python_tests/test_plans.py
  step decode-timings 75 $PY bench/sweep.py --decode --out "$OUT/sweep-decode.json"
elif [ "$STAGE" = bench ]; then
  export AK_BENCH_FULL=1
  step memcheck-python 300 compute-sanitizer --tool memcheck --error-exitcode 1 $PY scripts/gpu_smoke.py
  step pytest-all 580 $PY -m pytest -q -x python_tests
  step bench-pytest 300 $PY -m pytest bench/ --benchmark-only --benchmark-columns=median,iqr,rounds --benchmark-json=bench/results/bench-cuda.json
  step sweep 580 $PY bench/sweep.py
  step sweep-mean 580 $PY bench/sweep.py --objective mean
  step e2e 300 $PY bench/e2e_decode.py
  step report 60 $PY bench/report.py
  cp bench/results/*cuda* "$OUT"/ 2>/dev/null
else
  echo "unknown stage $STAGE" >&2; exit 2
fi
cat "$OUT/summary.txt"
exit $status
