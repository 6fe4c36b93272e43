"""Importing the real client packages (ultralytics, timm, thop) in tests: skip when one is missing, except where
CI installed it (TORCHUTILS_EXT_REAL_MODELS=1), where a missing package fails the test instead."""
import importlib
import os
import tempfile

import pytest

REQUIRED = os.environ.get('TORCHUTILS_EXT_REAL_MODELS') == '1'


def need(module):
    if module.split('.')[0] == 'ultralytics':  # offline, settings/config in a throwaway folder
        os.environ.setdefault('YOLO_OFFLINE', '1')
        os.environ.setdefault('YOLO_CONFIG_DIR', tempfile.mkdtemp(prefix='yolo-cfg-'))
    try:
        return importlib.import_module(module)
    except Exception as e:  # ImportError, or torchvision failing beside a CPU-only torch
        why = f'{module} not importable: {type(e).__name__}: {e}'
        if REQUIRED:
            pytest.fail(f'TORCHUTILS_EXT_REAL_MODELS=1 but {why}')
        pytest.skip(why, allow_module_level=True)  # also from a module's top level
