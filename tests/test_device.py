"""select_device / device_count / _log helpers. GPU paths run against a fake CUDA that follows
CUDA_VISIBLE_DEVICES the way the runtime does, so they run on this CPU-only machine."""
import logging
import os
import re
import subprocess
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import torchutils_ext
from torchutils_ext import device_count, select_device, time_sync
from torchutils_ext import device as device_mod
from torchutils_ext._log import LOGGER, check_version, colorstr, file_date, git_describe

CVD = 'CUDA_VISIBLE_DEVICES'


def _runtime_count(n_physical):
    # what the CUDA runtime sees: CUDA_VISIBLE_DEVICES cut at the first invalid entry
    cvd = os.environ.get(CVD)
    if cvd is None:
        return n_physical
    k = 0
    for tok in cvd.split(','):
        if tok.strip().isdigit() and int(tok) < n_physical:
            k += 1
        else:
            break
    return k


@pytest.fixture
def env(monkeypatch):
    monkeypatch.delenv(CVD, raising=False)  # monkeypatch restores the real value afterwards
    return monkeypatch


@pytest.fixture
def fake_cuda(env):
    def install(n_physical):
        env.setattr(torch.cuda, 'is_available', lambda: _runtime_count(n_physical) > 0)
        env.setattr(torch.cuda, 'device_count', lambda: _runtime_count(n_physical))
        env.setattr(torch.cuda, 'get_device_properties',
                    lambda i: SimpleNamespace(name=f'FakeGPU{i}', total_memory=16 << 30))
    return install


@pytest.fixture
def log(caplog):
    caplog.set_level(logging.INFO, logger='torchutils_ext')
    return caplog


# ---- CPU / auto ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize('arg', ['cpu', ' CPU ', 'Cpu'])
def test_cpu_sets_env_and_logs(env, log, arg):
    assert select_device(arg) == torch.device('cpu')
    assert os.environ[CVD] == '-1'  # the seed's behaviour: hides GPUs from torch
    line = log.records[-1].getMessage()
    assert line.startswith('YOLOv5 🚀 ') and f'torch-{torch.__version__}' in line and line.endswith('CPU\n')


def test_newline_false_strips(env, log):
    select_device('cpu', newline=False)
    assert log.records[-1].getMessage().endswith('CPU')


@pytest.mark.parametrize('arg', ['', None, 'none'])
def test_auto_on_cpu_machine_leaves_env(env, arg):
    if torch.cuda.is_available():
        pytest.skip('needs a machine without CUDA')
    assert select_device(arg) == torch.device('cpu')
    assert CVD not in os.environ


# ---- GPU requests against the fake runtime ------------------------------------------------------------------

@pytest.mark.parametrize('arg, visible', [
    ('0', '0'), (0, '0'), ('cuda:1', '1'), (' 0, 1 ', '0,1'), ('10,11', '10,11'), ('cuda:0,cuda:3', '0,3'),
    ([2, 3], '2,3'), (torch.device('cuda:2'), '2'), ('cuda', '0')])
def test_gpu_parsing(fake_cuda, log, arg, visible):
    fake_cuda(12)
    assert select_device(arg) == torch.device('cuda:0')
    assert os.environ[CVD] == visible
    msg = log.records[-1].getMessage()
    ids = visible.split(',')
    assert re.findall(r'CUDA:(\d+) \(FakeGPU\d, 16384MiB\)', msg) == ids  # one line per device, by comma
    assert msg.count('\n') == len(ids)


def test_two_digit_ids_count_as_two_devices(fake_cuda, log):
    # the seed counted characters: '10,11' needed 4 GPUs; here it needs 2 visible after masking
    fake_cuda(12)
    select_device('10,11', batch_size=4)
    msg = log.records[-1].getMessage()
    assert 'CUDA:10 (FakeGPU0' in msg and 'CUDA:11 (FakeGPU1' in msg
    second = msg.splitlines()[1]
    assert second.index('CUDA:11') == msg.index('CUDA:10') + 1  # aligned under the first (the seed's layout)


def test_auto_picks_gpu_without_touching_env(fake_cuda, log):
    fake_cuda(2)
    assert select_device('') == torch.device('cuda:0')
    assert CVD not in os.environ
    assert 'CUDA:0 (FakeGPU0' in log.records[-1].getMessage()


@pytest.mark.parametrize('arg', ['-1', 'cuda:x', '0,,1', '0,', 'gpu', '1.5', '0,0', 'cuda:-1'])
def test_bad_strings_raise_and_leave_env(fake_cuda, arg):
    fake_cuda(4)
    os.environ[CVD] = '3,2'
    with pytest.raises(ValueError, match='Invalid CUDA'):
        select_device(arg)
    assert os.environ[CVD] == '3,2'


@pytest.mark.parametrize('preset', [None, '1'])
def test_nonexistent_index_raises_and_restores_env(fake_cuda, preset):
    fake_cuda(2)
    if preset is not None:
        os.environ[CVD] = preset
    with pytest.raises(ValueError, match='5'):
        select_device('5')
    assert os.environ.get(CVD) == preset
    with pytest.raises(ValueError):
        select_device('0,7')  # 7 cuts the visible list to one device
    assert os.environ.get(CVD) == preset


@pytest.mark.parametrize('kw', ['batch_size', 'batch'])  # batch: Ultralytics 8.0-8.3's name for batch_size
def test_batch_size_not_multiple(fake_cuda, kw):
    assert select_device('cpu', **{kw: 16}) == torch.device('cpu')
    fake_cuda(4)
    os.environ[CVD] = '0'
    with pytest.raises(ValueError, match='batch-size 5 not multiple of GPU count 2'):
        select_device('0,1', **{kw: 5})
    assert os.environ[CVD] == '0'
    assert select_device('0,1', **{kw: 6}) == torch.device('cuda:0')


def test_batch_and_batch_size_together(fake_cuda):
    fake_cuda(4)
    assert select_device('0,1', 6, batch=6) == torch.device('cuda:0')  # the same value twice is fine
    with pytest.raises(TypeError, match='batch_size=4 and batch=6'):
        select_device('0,1', 4, batch=6)


def test_cpu_only_gpu_request_names_problem(env):
    env.setattr(torch.cuda, 'is_available', lambda: False)
    os.environ[CVD] = '0'
    with pytest.raises(ValueError, match='CUDA is not available'):
        select_device('0')
    assert os.environ[CVD] == '0'


def test_real_cpu_only_build_rejects_gpu(env):
    if torch.cuda.is_available():
        pytest.skip('needs a machine without CUDA')
    with pytest.raises(ValueError):
        select_device('cuda:0')
    assert CVD not in os.environ


# ---- MPS ----------------------------------------------------------------------------------------------------

def test_mps_when_available(env, log):
    env.setattr(torch.backends.mps, 'is_available', lambda: True)
    assert select_device('mps') == torch.device('mps')
    assert log.records[-1].getMessage().endswith('MPS\n')
    assert os.environ[CVD] == '-1'


def test_mps_unavailable_falls_back_to_cpu(env, log):
    env.setattr(torch.backends.mps, 'is_available', lambda: False)
    assert select_device('mps') == torch.device('cpu')
    assert any('MPS requested' in r.getMessage() for r in log.records)


# ---- device_count ----------------------------------------------------------------------------------------------

def test_device_count_without_nvidia_smi(env, tmp_path):
    env.setenv('PATH', str(tmp_path))  # no nvidia-smi (nor anything else) on PATH
    n = device_count()
    assert type(n) is int and n >= 0
    if not torch.cuda.is_available():
        assert n == 0


@pytest.fixture
def fake_nvml(env):
    env.setattr(device_mod, '_torch_cuda_built', lambda: False)  # take the NVML path even on CUDA torch
    state = {'count': 4, 'fail': False, 'open': 0}

    def init():
        if state['fail']:
            raise RuntimeError('NVML Shared Library Not Found')
        state['open'] += 1

    def shutdown():
        state['open'] -= 1

    mod = types.ModuleType('pynvml')
    mod.nvmlInit, mod.nvmlShutdown = init, shutdown
    mod.nvmlDeviceGetCount = lambda: state['count']
    env.setitem(sys.modules, 'pynvml', mod)
    return state


@pytest.mark.parametrize('cvd, expect', [(None, 4), ('1,3', 2), ('1,7,2', 1), ('-1', 0), ('', 0),
                                         ('GPU-5c2a', 1), ('3, 2', 2)])
def test_device_count_nvml_honours_visible_devices(fake_nvml, cvd, expect):
    if cvd is not None:
        os.environ[CVD] = cvd
    assert device_count() == expect
    assert fake_nvml['open'] == 0  # shut down again


def test_device_count_nvml_failure_returns_zero(fake_nvml):
    fake_nvml['fail'] = True
    assert device_count() == 0


def test_time_sync_is_float():
    a = time_sync()
    assert isinstance(a, float) and time_sync() >= a


# ---- _log helpers -------------------------------------------------------------------------------------------

def test_colorstr():
    assert colorstr('hi') == '\033[34m\033[1mhi\033[0m'
    assert colorstr('red', 'underline', 'x') == '\033[31m\033[4mx\033[0m'


@pytest.mark.parametrize('cur, low, pinned, expect', [
    ('1.12.0', '1.11.0', False, True), ('1.9.0', '1.10.0', False, False), ('1.10.0', '1.9.0', False, True),
    ('1.12.0', '1.12.0', True, True), ('1.12.1', '1.12.0', True, False)])
def test_check_version(cur, low, pinned, expect):
    assert check_version(cur, low, pinned=pinned) is expect


def test_check_version_hard_raises():
    with pytest.raises(RuntimeError):
        check_version('1.0', '2.0', hard=True)


def test_git_describe_and_file_date(tmp_path):
    assert git_describe(tmp_path) == ''  # not a repo: empty, no exception
    f = tmp_path / 'f'
    f.write_text('x')
    assert re.fullmatch(r'\d{4}-[1-9]\d?-[1-9]\d?', file_date(f))


def test_logger_prints_info_without_configuring_root():
    # a fresh interpreter: importing must leave root logging alone yet show INFO lines, plain, once
    code = ('import logging, torchutils_ext as t; assert not logging.getLogger().handlers; '
            "t.select_device('cpu')")
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, 'PYTHONPATH': str(Path(torchutils_ext.__file__).parents[1])})
    assert r.returncode == 0, r.stderr
    assert r.stderr.count('YOLOv5 🚀') == 1 and r.stderr.rstrip().endswith('CPU')
    assert LOGGER.name == 'torchutils_ext' and torchutils_ext.training.LOGGER is LOGGER
