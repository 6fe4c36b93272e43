# Sourced by test.sh and bench.sh: a virtualenv with torch and the test tools, and this package built
# against that torch.
#   VENV        virtualenv to use (created if missing; default .venv)
#   TORCH_SPEC  torch to install (default torch==2.13.0, the CPU build; torch==2.14.1 is a CUDA build)
#   TEST_EXTRAS more packages for the real-model tests, e.g. "torchvision==0.29.1 ultralytics timm" (they need
#               torchvision, which imports only beside the CUDA torch build)
#   YOLOV5_CLIENT=1 also install YOLOv5 v7.0 (the `yolov5` PyPI package) for tests/test_yolov5_client.py: it
#               needs TEST_EXTRAS with torchvision and ultralytics (its utils/general.py imports ultralytics)
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
if [ "${YOLOV5_CLIENT:-0}" = 1 ]; then
  # yolov5 7.0.14's metadata asks for heavy extras (boto3, sahi, huggingface-hub<0.25, ...) and would move torch:
  # install it and roboflow (which its train.py imports) alone, then only what yolov5.models.yolo, .train and .val
  # import. numpy<2.4 keeps np.trapz (metrics.compute_ap); setuptools<81 keeps pkg_resources (utils/general.py).
  "$PY" -m pip install -q --no-deps yolov5==7.0.14 roboflow==1.7.3
  "$PY" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}" "numpy<2.4" "setuptools>=77.0.3,<81" ultralytics-thop \
    opencv-python-headless pandas requests psutil PyYAML tqdm matplotlib seaborn requests_toolbelt python-dotenv \
    pillow-avif-plugin
fi
# --no-build-isolation: build against the torch that will import the extension
"$PY" -m pip install -q --no-build-isolation -e .
"$PY" -c "import torchutils_ext as t; i = t.backend_info(); print('compiled:', i['compiled'], 'cuda:', i['cuda_compiled'])"
