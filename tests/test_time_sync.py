"""time_sync(): the seed's wall clock after a CUDA wait, and Ultralytics' device= keyword, which must skip the wait
for a CPU/MPS device. CUDA is faked (is_available, synchronize) so the waits are seen on a machine without one."""
import time

import pytest
import torch

import seed_api as seed
from torchutils_ext import time_sync


@pytest.fixture
def waits(monkeypatch):
    """Pretend CUDA is there; record every torch.cuda.synchronize call (its device argument)."""
    calls = []
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'synchronize', lambda device=None: calls.append(device))
    return calls


def test_wall_clock_like_the_seed():
    a, ref, b = time_sync(), time.time(), seed.time_sync()
    assert type(a) is float
    assert abs(a - ref) < 1.0 and a <= b  # time.time(), not perf_counter()/monotonic() (an arbitrary origin)
    time.sleep(0.02)
    assert time_sync() - a >= 0.015


def test_default_waits_for_cuda_as_the_seed(waits):
    time_sync()
    assert waits == [None]  # the current device, once
    seed.time_sync()
    assert waits == [None, None]


@pytest.mark.parametrize('device', ['cpu', torch.device('cpu'), 'mps', torch.device('mps')])
def test_cpu_and_mps_devices_never_wait_on_cuda(waits, device):
    t = time_sync(device=device)
    assert waits == [] and abs(t - time.time()) < 1.0
    time_sync(device)  # positional too
    assert waits == []


@pytest.mark.parametrize('device', ['cuda', 'cuda:1', torch.device('cuda', 1)])
def test_cuda_device_waits_for_that_device(waits, device):
    time_sync(device=device)
    assert waits == [torch.device(device)]


def test_no_cuda_no_wait(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    monkeypatch.setattr(torch.cuda, 'synchronize', lambda device=None: calls.append(device))
    time_sync()
    time_sync('cuda:0')
    assert calls == []
