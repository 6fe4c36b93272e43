#!/usr/bin/env bash
# Install torchutils_ext (see _install.sh) and run the benchmark comparison on YOLOv5-sized models.
# Extra arguments go to pytest, e.g.: bash scripts/bench.sh --models n,s --device cuda
set -euo pipefail
source "$(dirname "$0")/_install.sh"
"$PY" -m pytest benchmarks/ -q -p no:cacheprovider "$@"
