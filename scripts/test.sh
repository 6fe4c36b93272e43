#!/usr/bin/env bash
# Install torchutils_ext with its compiled ops into a virtualenv and run the tests.
#   VENV        virtualenv to use (created if missing; default .venv)
#   TORCH_SPEC  torch to install (default torch==2.13.0, the CPU build; torch==2.14.1 is a CUDA build)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q setuptools wheel
"$PY" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}" pytest hypothesis numpy ninja
# --no-build-isolation: build against the torch that will import the extension
"$PY" -m pip install -q --no-build-isolation -e .
"$PY" -c "import torchutils_ext as t; i = t.backend_info(); print('compiled:', i['compiled'], 'cuda:', i['cuda_compiled'])"
"$PY" -m pytest tests/ -q -p no:cacheprovider
