#!/usr/bin/env bash
# One prepared run for a lent GPU machine (no network, torch preinstalled), in two parts so that the quick one
# always fits a device budget that also pays for the machine's start:
#   bash benchmarks/gpu_check.sh quick            build for the visible GPU, CUDA tests, the probe (~3-5 min)
#   bash benchmarks/gpu_check.sh bench [s,l,x]    the training step (yolov5n/s), then the CUDA benchmark tables
#                                                 (after quick, on the same machine)
# Everything goes to $OUT (default benchmarks/results/gpu): check.log (build, tests, probe) or bench.log, and for
# bench train_step_cuda.{md,json} and the fresh cuda.{md,json,svg}. Old results are deleted first; each log starts
# with a stamp (commit, time, torch, CUDA, GPU) and each result file carries the same in its header, so figures
# from an earlier run can never come back looking new.
# COMMIT=<sha> names the commit where the copy has no .git.
set -uo pipefail
cd "$(dirname "$0")/.."
PART=${1:-quick}
MODELS=${2:-s,l,x}
OUT=${OUT:-benchmarks/results/gpu}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
unset TORCH_CUDA_ARCH_LIST  # setup.py builds for the visible GPU

stamp() {
  echo "# commit ${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)} · $(date -u +%FT%TZ) ·" \
    "$($PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' 2>&1) ·" \
    "$(nvidia-smi -L 2>/dev/null | head -1 || echo 'no nvidia-smi')"
}

case "$PART" in
quick)
  LOG="$OUT/check.log"
  rm -f "$OUT"/check.log "$OUT"/crash_*.log
  stamp > "$LOG"
  t0=$(date +%s)
  if ! $PY -m pip install --no-build-isolation --no-deps -e . >> "$LOG" 2>&1; then
    tail -40 "$LOG"; exit 1
  fi
  echo "build: $(( $(date +%s) - t0 )) s" | tee -a "$LOG"
  $PY -c "import torchutils_ext as t; print(t.backend_info())" 2>&1 | tee -a "$LOG"
  echo "== tests/test_cuda.py" >> "$LOG"
  $PY -X faulthandler -m pytest tests/test_cuda.py -q -rs -p no:cacheprovider 2>&1 | tee -a "$LOG" | tail -5
  echo "== the rest of the suite on this machine (not slow)" >> "$LOG"
  $PY -X faulthandler -m pytest tests/ -q -m "not slow" -p no:cacheprovider >> "$LOG" 2>&1
  rc=$?
  tail -3 "$LOG"
  if [ "$rc" -gt 1 ] || grep -q "Fatal Python error" "$LOG"; then  # a crash: name the file
    for f in tests/test_*.py; do
      { stamp; timeout 120 $PY -X faulthandler -m pytest "$f" -v -m "not slow" -p no:cacheprovider; } \
        > "$OUT/crash_$(basename "$f" .py).log" 2>&1
      echo "$f rc=$?" | tee -a "$LOG"
    done
  fi
  echo "== benchmarks/gpu_probe.py" >> "$LOG"
  timeout 240 $PY benchmarks/gpu_probe.py 2>&1 | tee -a "$LOG" | tail -25
  ;;
bench)
  LOG="$OUT/bench.log"
  rm -f "$LOG" "$OUT"/cuda*.md "$OUT"/cuda*.json "$OUT"/cuda*.svg "$OUT"/train_step_cuda.* \
    benchmarks/results/cuda*.md benchmarks/results/cuda*.json benchmarks/results/cuda*.svg
  stamp > "$LOG"
  # YOLOv5's training step, seed vs ours, first and on its own: short, and its table survives a timeout below.
  # It needs the yolov5 package (YOLOV5_CLIENT=1 in scripts/_install.sh); without it the log says skipped.
  timeout 150 $PY -m pytest benchmarks/test_bench_train_step.py --device cuda -q -rs -p no:cacheprovider >> "$LOG" 2>&1
  echo "train-step rc=$?" >> "$LOG"
  for f in benchmarks/results/cuda.md benchmarks/results/cuda.json; do
    [ -f "$f" ] && mv "$f" "$OUT/train_step_${f##*/}"
  done
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
