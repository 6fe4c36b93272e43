"""Which GPUs a build serves, and what happens on one it does not: decided from the compute capability before
the first launch, simulated here on the CPU."""
import pytest
import torch

from torchutils_ext import _cuda_arch, _ops

CUDA13 = [(7, 5), (8, 0), (8, 6), (8, 7), (8, 8), (8, 9), (9, 0), (10, 0), (10, 3), (11, 0), (12, 0), (12, 1)]


def test_parse_arch_list():
    assert _cuda_arch.parse_arch_list('8.0;9.0') == [(8, 0, False), (9, 0, False)]
    assert _cuda_arch.parse_arch_list('7.5 12.0+PTX') == [(7, 5, False), (12, 0, True)]
    assert _cuda_arch.parse_arch_list('9.0a') == [(9, 0, False)]
    assert _cuda_arch.parse_arch_list('Ampere') is None and _cuda_arch.parse_arch_list(None) is None


def test_serves_follows_cuda_binary_compatibility():
    archs = _cuda_arch.parse_arch_list('8.0;9.0')
    assert _cuda_arch.serves(archs, (8, 6)) and _cuda_arch.serves(archs, (9, 0))
    assert not _cuda_arch.serves(archs, (7, 5)) and not _cuda_arch.serves(archs, (10, 0))
    assert not _cuda_arch.serves(archs, (12, 0))  # Blackwell consumer: the old default failed every launch
    ptx = _cuda_arch.parse_arch_list('8.0+PTX')
    assert _cuda_arch.serves(ptx, (12, 0)) and not _cuda_arch.serves(ptx, (7, 5))


def test_default_arch_list_serves_every_gpu_nvcc13_builds_for():
    import ast
    import pathlib
    src = (pathlib.Path(__file__).parent.parent / 'setup.py').read_text()
    default = next(ast.literal_eval(n.value) for n in ast.parse(src).body if isinstance(n, ast.Assign)
                   and getattr(n.targets[0], 'id', '') == 'DEFAULT_ARCHS')
    archs = _cuda_arch.parse_arch_list(default)
    assert all(_cuda_arch.serves(archs, cap) for cap in CUDA13), default
    assert _cuda_arch.serves(archs, (13, 0))  # a later GPU: the PTX


@pytest.fixture
def gpu_12_0(monkeypatch):
    """A CUDA build for 8.0;9.0 on a simulated compute capability 12.0 GPU."""
    monkeypatch.setattr(_cuda_arch, '_CHECKED', {})
    monkeypatch.setattr(_ops, '_KERNELS', {**_ops._KERNELS, ('ema_update_', 'cuda'): True})
    monkeypatch.setattr(_ops, '_BUILT_ARCHS', '8.0;9.0')
    monkeypatch.setattr(torch.cuda, 'current_device', lambda: 0)
    monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda i=None: (12, 0))


def test_uncovered_gpu_warns_once_and_takes_the_pure_torch_path(gpu_12_0):
    with pytest.warns(RuntimeWarning, match='built for compute capabilities 8.0;9.0.*cuda:0 is 12.0'):
        assert _ops.use_ext('ema_update_', 'cuda:0') is False
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert _ops.use_ext('ema_update_', 'cuda') is False  # decided once per device: no second warning


def test_uncovered_gpu_with_ext_forced_is_a_clear_error(gpu_12_0, monkeypatch):
    monkeypatch.setattr(_ops, '_backend', 'ext')
    with pytest.warns(RuntimeWarning):
        with pytest.raises(RuntimeError, match='TORCH_CUDA_ARCH_LIST="12.0"'):
            _ops.use_ext('ema_update_', 'cuda:0')


def test_covered_gpu_uses_the_kernels(gpu_12_0, monkeypatch):
    monkeypatch.setattr(_ops, '_BUILT_ARCHS', '8.0;9.0;12.0')
    assert _ops.use_ext('ema_update_', 'cuda:0') is True
