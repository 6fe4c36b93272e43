"""The public surface: every seed name exists with the seed's signature, and the package can stand in for
YOLOv5's utils.torch_utils."""
import inspect
import sys
import types

import pytest
import torch.nn as nn

import torchutils_ext

E = inspect.Parameter.empty
# The seed's signatures, written out: (name, default) in order; E = no default.
SEED = {
    'smart_DDP': [('model', E)],
    'torch_distributed_zero_first': [('local_rank', E)],
    'device_count': [],
    'select_device': [('device', ''), ('batch_size', 0), ('newline', True)],
    'time_sync': [],
    'profile': [('input', E), ('ops', E), ('n', 10), ('device', None)],
    'is_parallel': [('model', E)],
    'de_parallel': [('model', E)],
    'initialize_weights': [('model', E)],
    'find_modules': [('model', E), ('mclass', nn.Conv2d)],
    'sparsity': [('model', E)],
    'prune': [('model', E), ('amount', 0.3)],
    'fuse_conv_and_bn': [('conv', E), ('bn', E)],
    'model_info': [('model', E), ('verbose', False), ('img_size', 640)],
    'scale_img': [('img', E), ('ratio', 1.0), ('same_shape', False), ('gs', 32)],
    'copy_attr': [('a', E), ('b', E), ('include', ()), ('exclude', ())],
    'smart_optimizer': [('model', E), ('name', 'Adam'), ('lr', 0.001), ('momentum', 0.9), ('decay', 1e-5)],
    'smart_resume': [('ckpt', E), ('optimizer', E), ('ema', None), ('weights', 'yolov5s.pt'), ('epochs', 300),
                     ('resume', True)],
    'EarlyStopping': [('patience', 30)],
    'EarlyStopping.__call__': [('self', E), ('epoch', E), ('fitness', E)],
    'ModelEMA': [('model', E), ('decay', 0.9999), ('tau', 2000), ('updates', 0)],
    'ModelEMA.update': [('self', E), ('model', E)],
    'ModelEMA.update_attr': [('self', E), ('model', E), ('include', ()), ('exclude', ('process_group', 'reducer'))],
}
# Names YOLOv5 v7.0/master import from utils.torch_utils beyond the seed text. None: default not compared.
EXTRA = {
    'smart_inference_mode': [('torch_1_9', None), ('mode', True)],
    'smart_amp_autocast': [('amp', False), ('enabled', None), ('device', 'cuda')],
    'smartCrossEntropyLoss': [('label_smoothing', 0.0)],
    'reshape_classifier_output': [('model', E), ('n', 1000)],
    'smart_hub_load': [('repo', 'ultralytics/yolov5'), ('model', 'yolov5s'), ('kwargs', E)],
}
SEED_CONSTANTS = ['LOCAL_RANK', 'RANK', 'WORLD_SIZE']
# Modules owned elsewhere may add options after the seed's parameters; ours must match exactly.
MAY_EXTEND = {'prune', 'ModelEMA', 'fuse_conv_and_bn', 'sparsity', 'ModelEMA.update', 'ModelEMA.update_attr',
              # Ultralytics 8.x / YOLOv5 master keywords (test_client_signatures.py)
              'model_info', 'time_sync', 'select_device'}


def _resolve(dotted):
    obj = torchutils_ext
    for part in dotted.split('.'):
        obj = getattr(obj, part)
    return obj


def _params(dotted):
    return list(inspect.signature(_resolve(dotted)).parameters.values())


@pytest.mark.parametrize('name', SEED_CONSTANTS + sorted({k.split('.')[0] for k in SEED}) + sorted(EXTRA))
def test_name_exported(name):
    assert hasattr(torchutils_ext, name)
    assert name in torchutils_ext.__all__


@pytest.mark.parametrize('name', sorted(SEED))
def test_seed_signature(name):
    got = _params(name)
    want = SEED[name]
    head = [(p.name, p.default) for p in got[:len(want)]]
    assert head == want
    assert [type(d) for _, d in head] == [type(d) for _, d in want]  # 0.3 is not 0, () is not []
    if name in MAY_EXTEND:
        # anything added must not break a seed-style call: optional, or keyword-only with a default
        assert all(p.default is not E or p.kind is p.VAR_KEYWORD for p in got[len(want):])
    else:
        assert len(got) == len(want)
    assert all(p.kind in (p.POSITIONAL_OR_KEYWORD,) for p in got[:len(want)])


@pytest.mark.parametrize('name', sorted(EXTRA))
def test_extra_signature(name):
    got = _params(name)
    want = EXTRA[name]
    assert [p.name for p in got] == [n for n, _ in want]
    for p, (_, d) in zip(got, want):
        if d is not None:
            assert p.default == d and type(p.default) is type(d)
    if name == 'smart_hub_load':
        assert got[-1].kind is inspect.Parameter.VAR_KEYWORD


def test_constants_are_ints():
    assert all(type(getattr(torchutils_ext, n)) is int for n in SEED_CONSTANTS)


def test_stands_in_for_utils_torch_utils(monkeypatch):
    pkg = types.ModuleType('utils')
    pkg.__path__ = []
    monkeypatch.setitem(sys.modules, 'utils', pkg)
    monkeypatch.setitem(sys.modules, 'utils.torch_utils', torchutils_ext)
    ns = {}
    exec('from utils.torch_utils import (LOCAL_RANK, RANK, WORLD_SIZE, ModelEMA, EarlyStopping, de_parallel, '
         'select_device, smart_DDP, smart_optimizer, smart_resume, torch_distributed_zero_first, '
         'smart_inference_mode, smart_hub_load, reshape_classifier_output, smartCrossEntropyLoss, '
         'smart_amp_autocast, model_info, profile, time_sync, fuse_conv_and_bn, scale_img, copy_attr, '
         'initialize_weights, find_modules, sparsity, prune, is_parallel, device_count)', ns)
    assert ns['select_device'] is torchutils_ext.select_device and ns['ModelEMA'] is torchutils_ext.ModelEMA
    import utils.torch_utils as tu
    from utils import torch_utils
    assert tu is torchutils_ext and torch_utils is torchutils_ext
