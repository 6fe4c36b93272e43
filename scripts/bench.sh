#!/usr/bin/env bash
# Install torchutils_ext (as scripts/test.sh does) and run the benchmark comparison on YOLOv5-sized models.
# Extra arguments go to pytest, e.g.: bash scripts/bench.sh --models n,s --device cuda
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q setuptools wheel
"$PY" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}" pytest numpy ninja
"$PY" -m pip install -q --no-build-isolation -e .
"$PY" -m pytest benchmarks/ -q -p no:cacheprovider "$@"
