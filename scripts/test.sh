#!/usr/bin/env bash
# Install torchutils_ext with its compiled ops into a virtualenv (see _install.sh) and run the tests.
set -euo pipefail
source "$(dirname "$0")/_install.sh"
"$PY" -m pytest tests/ -q -p no:cacheprovider --durations=8
