#!/usr/bin/env bash
# One prepared run for a lent GPU machine (no network, torch and a CUDA toolkit preinstalled), in two parts:
#   bash benchmarks/gpu_check.sh quick            build for the visible GPU, the CUDA tests, the latency probe
#   bash benchmarks/gpu_check.sh bench [s,l,x]    the training step (yolov5n/s, fp32 and bf16), then the CUDA
#                                                 benchmark tables (after quick, on the same machine)
# quick fits 6 minutes by construction: each step runs under its own timeout (build 130 s, the op tests on CUDA
# 95 s, the capture tests 40 + 45 s, the probe 40 s: 350 s in all; a step out of time is interrupted, and pytest
# still prints what ran), a failed step does not stop the next, and nothing is rerun. Everything goes to $OUT (default
# benchmarks/results/gpu): summary.txt (one screen: each step's result and its failures), one log per step,
# and check.log (the summary, then every step's log); bench writes bench.log, train_step_cuda.{md,json} and the
# fresh cuda.{md,json,svg}. Old results are deleted first; each log starts with a stamp (commit, time, torch,
# CUDA, GPU), so figures from an earlier run can never come back looking new.
# Without a GPU (a dry run) the build targets sm_90, the CUDA test cases skip and the probe is skipped.
# COMMIT=<sha> names the commit where the copy has no .git.
set -uo pipefail
cd "$(dirname "$0")/.."
PART=${1:-quick}
MODELS=${2:-s,l,x}
OUT=${OUT:-benchmarks/results/gpu}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}

STAMP="# commit ${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)} · $(date -u +%FT%TZ) ·\
 $($PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' 2>&1) ·\
 $(nvidia-smi -L 2>/dev/null | head -1 || echo 'no nvidia-smi')"
stamp() { echo "$STAMP"; }

# step NAME LIMIT_S CMD...: CMD under its own timeout (SIGINT first: pytest then prints its summary), its output
# in $OUT/NAME.log; one summary line (exit status, seconds, the last result line) and up to 8 failures.
step() {
  local name=$1 limit=$2 t0 rc result
  shift 2
  t0=$(date +%s)
  { stamp; echo "\$ $*"; } > "$OUT/$name.log"
  timeout -s INT -k 10 "$limit" "$@" >> "$OUT/$name.log" 2>&1
  rc=$?
  result=$(grep -E '[0-9]+ (passed|failed|skipped|errors?|deselected)|no tests ran|^probe: |Successfully' \
    "$OUT/$name.log" | tail -1)
  [ "$rc" = 124 ] && result="TIMED OUT after ${limit}s; $result"
  printf '%-9s rc=%-3s %4ss  %s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" "$result" >> "$OUT/summary.txt"
  grep -E '^(FAILED|ERROR) |Error: |error: ' "$OUT/$name.log" | head -8 | cut -c1-200 | sed 's/^/    /' \
    >> "$OUT/summary.txt"
}

case "$PART" in
quick)
  rm -f "$OUT"/{summary.txt,check.log,build.log,ops.log,capture.log,compiled.log,probe.log}
  t_start=$(date +%s)
  stamp > "$OUT/summary.txt"
  if $PY -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
    unset TORCH_CUDA_ARCH_LIST  # setup.py builds for the visible GPU only
  else
    export TORCH_CUDA_ARCH_LIST=9.0  # dry run: one arch stands in for the GPU's
    echo "no GPU visible: a dry run (build for sm_90, CUDA cases skip, no probe)" >> "$OUT/summary.txt"
  fi
  PYTEST=($PY -X faulthandler -m pytest -q -rfE -p no:cacheprovider --continue-on-collection-errors --durations=5)
  export TORCHUTILS_EXT_REQUIRE_EXT=1  # the compiled ops must load: no silent fallback to the pure-torch path
  # The system g++ (a shared libstdc++, as torch's): the lent H200's CXX=/opt/gcc/bin/g++ linked libstdc++ into
  # the extension statically, and every error message with a number in it then crashed (README, Building).
  if command -v g++ >/dev/null && command -v gcc >/dev/null; then export CC=gcc CXX=g++; fi
  step build 130 env TORCHUTILS_EXT_CUDA=1 $PY -m pip install --no-build-isolation --no-deps --no-index -e .
  $PY -c "import torchutils_ext as t; i = t.backend_info(); print('backend:', i.get('build'), i['load_error'] or '')" \
    >> "$OUT/summary.txt" 2>&1
  # every op test's CUDA cases (the device fixture): dtype pairs, strides, bad input, guard, plan; heaviest last
  step ops 95 "${PYTEST[@]}" -m cuda tests/test_ops_ema.py tests/test_ema_guard.py tests/test_ops_count.py \
    tests/test_reliability.py tests/test_ops_fold.py tests/test_ema_model.py
  step capture 40 "${PYTEST[@]}" tests/test_cuda.py tests/test_profiling.py -m cuda \
    --deselect tests/test_cuda.py::test_capturable_ema_under_reduce_overhead_compile
  step compiled 45 "${PYTEST[@]}" tests/test_cuda.py::test_capturable_ema_under_reduce_overhead_compile
  if grep -q "dry run" "$OUT/summary.txt"; then
    echo "probe     skipped (no GPU)" >> "$OUT/summary.txt"
  else
    step probe 40 $PY benchmarks/gpu_probe.py --models s,l
  fi
  echo "total $(( $(date +%s) - t_start )) s" >> "$OUT/summary.txt"
  { cat "$OUT/summary.txt"; for f in build ops capture compiled probe; do
      [ -f "$OUT/$f.log" ] && { echo; echo "=== $f"; cat "$OUT/$f.log"; }; done; } > "$OUT/check.log"
  cat "$OUT/summary.txt"
  ;;
bench)
  LOG="$OUT/bench.log"
  rm -f "$LOG" "$OUT"/cuda*.{md,json,svg} "$OUT"/train_step_cuda*.{md,json,svg} \
    benchmarks/results/cuda*.{md,json,svg} benchmarks/results/train_step_cuda*.{md,json,svg}
  stamp > "$LOG"
  # YOLOv5's training step, seed vs ours, first and on its own: short, and its table survives a timeout below.
  # It needs the yolov5 package (YOLOV5_CLIENT=1 in scripts/_install.sh); without it the log says skipped.
  timeout 150 $PY -m pytest benchmarks/test_bench_train_step.py --device cuda -q -rs -p no:cacheprovider >> "$LOG" 2>&1
  echo "train-step rc=$?" >> "$LOG"
  cp benchmarks/results/train_step_cuda.* "$OUT/" 2>/dev/null  # a run of the training step alone: its own files
  timeout 420 $PY -m pytest benchmarks/ --device cuda --models "$MODELS" -q -p no:cacheprovider \
    --ignore=benchmarks/test_bench_train_step.py >> "$LOG" 2>&1
  echo "benchmark rc=$?" >> "$LOG"
  grep -E '^\||^#|passed|failed|error|rc=' "$LOG" | tail -60
  # only what this run wrote (deleted above); their headers carry the date, commit, torch, CUDA and GPU
  cp benchmarks/results/cuda*.md benchmarks/results/cuda*.json benchmarks/results/cuda*.svg "$OUT/" 2>/dev/null
  ;;
*)
  echo "usage: bash benchmarks/gpu_check.sh quick | bench [models]"; exit 2 ;;
esac
exit 0
