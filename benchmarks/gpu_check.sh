#!/usr/bin/env bash
# One prepared run for a lent GPU machine (no network, torch preinstalled): build the CUDA kernels for the
# local GPU against the torch already there, run the CUDA tests and the rest of the suite, then the CUDA
# benchmarks, and print one table. Logs and results go to $OUT (default benchmarks/results/gpu).
# Usage: bash benchmarks/gpu_check.sh [models, default s,l,x]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
MODELS=${1:-s,l,x}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
unset TORCH_CUDA_ARCH_LIST  # setup.py builds for the visible GPU

{ nvidia-smi -L; $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } 2>&1 | tee "$OUT/env.txt"
t0=$(date +%s)
if ! $PY -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; exit 1
fi
echo "build: $(( $(date +%s) - t0 )) s" | tee -a "$OUT/env.txt"
$PY -c "import torchutils_ext as t; print(t.backend_info())" | tee -a "$OUT/env.txt"

$PY -m pytest tests/test_cuda.py -q -rs 2>&1 | tee "$OUT/cuda_tests.txt" | tail -15
# faulthandler: a crash prints the Python stack. Session 1 saw a segfault under torch 2.11 on the H100 that
# CPU runs of 2.11/2.13/2.14 do not show; on a crash, rerun file by file (verbose) to name the test.
$PY -X faulthandler -m pytest tests/ -q -m "not slow" -p no:cacheprovider > "$OUT/all_tests_full.txt" 2>&1
rc=$?
tail -6 "$OUT/all_tests_full.txt" | tee "$OUT/all_tests.txt"
if [ "$rc" -gt 1 ] || grep -q "Fatal Python error" "$OUT/all_tests_full.txt"; then
  echo "test run ended with rc=$rc: per-file rerun" | tee -a "$OUT/all_tests.txt"
  for f in tests/test_*.py; do
    timeout 120 $PY -X faulthandler -m pytest "$f" -v -m "not slow" -p no:cacheprovider \
      > "$OUT/crash_$(basename "$f" .py).txt" 2>&1
    echo "$f rc=$?" | tee -a "$OUT/all_tests.txt"
  done
fi
timeout 300 $PY -m pytest benchmarks/ --device cuda --models "$MODELS" -q -p no:cacheprovider 2>&1 \
  | tee "$OUT/bench.txt" | grep -E '^\||^#|passed|failed|error'
cp benchmarks/results/cuda*.md benchmarks/results/cuda*.json "$OUT/" 2>/dev/null
exit 0
