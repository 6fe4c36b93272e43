"""A real YOLOv5 as the client: the ``yolov5`` PyPI package (YOLOv5 v7.0) run once with its own
``utils/torch_utils.py`` and once with torchutils_ext in its place, each in a fresh process (``yolov5_client.py``).

- yolov5n/s built from the package's yaml: state_dict and eval output bit-identical; ``fuse()`` within 1e-5;
  ModelEMA over 5 perturbed updates bit-identical; prune + sparsity, model_info's logged line and
  smart_optimizer's groups identical;
- ``train.main`` (YOLOv5's training entry point) for 2 epochs on a generated 8-image dataset: per-batch and
  per-epoch losses and the final fp32 EMA identical, and each run's last.pt loads in the other.

The package comes with CI's CUDA-torch venv (``scripts/_install.sh`` with ``YOLOV5_CLIENT=1``); elsewhere these
tests skip, unless TORCHUTILS_EXT_YOLOV5=1 (set by .ci/run), which turns a missing package into a failure.
``YOLOV5_DIR=/path/to/yolov5`` runs the build/fuse/EMA comparison against a YOLOv5 git checkout as well (master
needs ``ultralytics`` installed for its own torch_utils).
"""
import importlib.util
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

RUNNER = Path(__file__).with_name('yolov5_client.py')
REQUIRED = os.environ.get('TORCHUTILS_EXT_YOLOV5') == '1'
CHECKOUT = os.environ.get('YOLOV5_DIR')
CFGS = ['yolov5n.yaml', 'yolov5s.yaml']

pytestmark = pytest.mark.slow


def _need_package():
    if importlib.util.find_spec('yolov5') is None:
        if REQUIRED:
            pytest.fail('TORCHUTILS_EXT_YOLOV5=1 but the yolov5 package is not installed')
        pytest.skip('yolov5 (PyPI, YOLOv5 v7.0) not installed; YOLOV5_CLIENT=1 bash scripts/test.sh installs it')


def _run(tmp, which, job, *extra):
    out = tmp / f'{which}-{job}.pt'
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, str(RUNNER), which, job, str(out), *extra], capture_output=True,
                       text=True, timeout=900, cwd=tmp)
    if p.returncode:
        raise AssertionError(f'{which} {job} failed (exit {p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}')
    return torch.load(out, weights_only=False), time.perf_counter() - t0


@pytest.fixture(scope='module')
def models(tmp_path_factory):
    _need_package()
    tmp = tmp_path_factory.mktemp('y5models')
    return {w: _run(tmp, w, 'models')[0] for w in ('own', 'ours')}


@pytest.fixture(scope='module')
def training(tmp_path_factory):
    _need_package()
    tmp = tmp_path_factory.mktemp('y5train')
    res, secs = {}, {}
    for w in ('own', 'ours'):
        res[w], secs[w] = _run(tmp, w, 'train', '--data', str(tmp / f'data-{w}'))
    ckpts = ','.join(res[w]['last'] for w in ('own', 'ours'))
    loads = {w: _run(tmp, w, 'load', '--ckpt', ckpts)[0] for w in ('own', 'ours')}
    sys.stderr.write(f'\nyolov5 train.main 2 epochs, CPU: own {secs["own"]:.1f} s, ours {secs["ours"]:.1f} s '
                     '(whole process)\n')
    return res, loads


def _assert_same_tensors(a, b, what):
    assert a.keys() == b.keys(), what
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f'{what}: {k} differs'


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.mark.parametrize('cfg', CFGS)
def test_build_is_bit_identical(models, cfg):
    own, ours = models['own'][cfg], models['ours'][cfg]
    _assert_same_tensors(own['state_dict'], ours['state_dict'], 'state_dict')
    assert torch.equal(own['eval'], ours['eval'])
    assert own['info_log'] == ours['info_log'] and 'GFLOPs' in ours['info_log'][0]


@pytest.mark.parametrize('cfg', CFGS)
def test_fuse_matches(models, cfg):
    own, ours = models['own'][cfg], models['ours'][cfg]
    assert own['bn_left'] == ours['bn_left'] == 0
    assert _rel(ours['fused'], own['fused']) <= 1e-5
    assert _rel(ours['fused'], own['eval']) <= 1e-5  # and the fused model still computes the unfused one
    assert own['fuse_log'] == ours['fuse_log']


@pytest.mark.parametrize('cfg', CFGS)
def test_ema_sparsity_optimizer_identical(models, cfg):
    own, ours = models['own'][cfg], models['ours'][cfg]
    _assert_same_tensors(own['ema'], ours['ema'], 'EMA after 5 updates')
    assert own['ema_updates'] == ours['ema_updates'] == 5
    assert own['sparsity'] == ours['sparsity'] and 0.29 < ours['sparsity'] < 0.31
    assert own['sparsity_before'] == ours['sparsity_before']
    assert own['optimizer'] == ours['optimizer'] and len(ours['optimizer']) == 3


@pytest.mark.parametrize('cfg', CFGS)
def test_model_info_returns_ultralytics_tuple(models, cfg):
    own, ours = models['own'][cfg], models['ours'][cfg]
    assert own['info_return'] is None  # v7.0's model_info returns nothing, so a tuple breaks no v7.0 caller
    n_l, n_p, n_g, gflops = ours['info_return']
    sd = ours['state_dict']
    assert n_p == n_g == sum(v.numel() for k, v in sd.items() if not k.endswith(('running_mean', 'running_var',
                                                                                   'num_batches_tracked', 'anchors')))
    assert 0 < n_l < 214 and gflops == pytest.approx(float(re.search(r'([\d.]+) GFLOPs', ours['info_log'][0])[1]),
                                                     abs=0.05)


def test_training_run_is_identical(training):
    (res, _) = training
    own, ours = res['own'], res['ours']
    assert len(own['batch_loss']) == 4 and len(own['epoch_vals']) == 2
    for a, b in zip(own['batch_loss'], ours['batch_loss']):
        assert [float(x) for x in a] == [float(x) for x in b]
    assert own['epoch_vals'] == ours['epoch_vals']
    assert own['ema_updates'] == ours['ema_updates'] > 0
    _assert_same_tensors(own['ema'], ours['ema'], 'final fp32 EMA')
    assert all(torch.isfinite(v).all() for v in ours['ema'].values() if v.is_floating_point())


def test_checkpoints_load_in_the_other(training):
    res, loads = training
    for w in ('own', 'ours'):
        ckpt = res[w]['last']
        assert torch.equal(loads['own'][ckpt], loads['ours'][ckpt]), f"{w}'s last.pt differs when loaded by the other"
    assert torch.equal(loads['ours'][res['own']['last']], loads['ours'][res['ours']['last']])


@pytest.mark.skipif(not CHECKOUT, reason='YOLOV5_DIR (a YOLOv5 git checkout) not set')
def test_checkout_build_fuse_ema(tmp_path):
    """The same comparison against a user's YOLOv5 checkout (master re-exports Ultralytics' model_info, whose
    log line differs in format: there, parameters, gradients and GFLOPs are compared as numbers)."""
    own = _run(tmp_path, 'own', 'models', '--checkout', CHECKOUT)[0]
    ours = _run(tmp_path, 'ours', 'models', '--checkout', CHECKOUT)[0]
    for cfg in CFGS:
        a, b = own[cfg], ours[cfg]
        _assert_same_tensors(a['state_dict'], b['state_dict'], 'state_dict')
        assert torch.equal(a['eval'], b['eval']) and a['bn_left'] == b['bn_left'] == 0
        assert _rel(b['fused'], a['fused']) <= 1e-5
        _assert_same_tensors(a['ema'], b['ema'], 'EMA after 5 updates')
        assert a['sparsity'] == b['sparsity'] and a['optimizer'] == b['optimizer']
        for la, lb in zip(a['info_log'] + a['fuse_log'], b['info_log'] + b['fuse_log']):
            nums = [re.search(r'([\d,]+) parameters, ([\d,]+) gradients, ([\d.]+) GFLOPs', s).groups() for s in (la, lb)]
            assert [x.replace(',', '') for x in nums[0]] == [x.replace(',', '') for x in nums[1]]
        if a['info_return'] is not None:  # master: Ultralytics' own tuple
            assert b['info_return'][:3] == a['info_return'][:3]
            assert b['info_return'][3] == pytest.approx(a['info_return'][3], rel=1e-3)
