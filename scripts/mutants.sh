#!/usr/bin/env bash
# Mutation check: small deliberate bugs, one at a time, each must fail the test suite (scripts/mutants.py).
# Needs the package built in place first (bash scripts/test.sh does that). Extra arguments go to mutants.py.
set -euo pipefail
cd "$(dirname "$0")/.."
"${PY:-${VENV:-.venv}/bin/python}" scripts/mutants.py "$@"
