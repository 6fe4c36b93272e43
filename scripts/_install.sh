# Sourced by test.sh and bench.sh: a virtualenv with torch and the test tools, and this package built
# against that torch.
#   VENV        virtualenv to use (created if missing; default .venv)
#   TORCH_SPEC  torch to install (default torch==2.13.0, the CPU build; torch==2.14.1 is a CUDA build)
#   TEST_EXTRAS more packages for the real-model tests, e.g. "torchvision==0.29.1 ultralytics timm" (they need
#               torchvision, which imports only beside the CUDA torch build)
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q setuptools wheel
"$PY" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}" pytest hypothesis numpy ninja
if [ -n "${TEST_EXTRAS:-}" ]; then
  # shellcheck disable=SC2086  # a list of requirement specs
  "$PY" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}" $TEST_EXTRAS  # torch pinned: extras must not move it
fi
# --no-build-isolation: build against the torch that will import the extension
"$PY" -m pip install -q --no-build-isolation -e .
"$PY" -c "import torchutils_ext as t; i = t.backend_info(); print('compiled:', i['compiled'], 'cuda:', i['cuda_compiled'])"
