"""count_zeros and sparsity: every dtype, -0.0, strides, parity with the seed's loop, opcheck."""
import pytest
import torch
import torch.nn as nn

import torchutils_ext as tx
from torchutils_ext import _ops

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.uint8, torch.int16,
          torch.int32, torch.int64, torch.bool, torch.complex64]


def sparse(shape, dtype, frac, seed, device='cpu'):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 10
    x[torch.rand(shape, generator=g) < frac] = 0
    return x.to(device=device, dtype=dtype)


def seed_count(ts):
    return sum(int((t == 0).sum()) for t in ts)


@pytest.mark.parametrize('dtype', DTYPES)
def test_count_zeros_every_dtype(backend, device, dtype):
    ts = [sparse((1000,), dtype, 0.3, 1, device), sparse((7, 9, 3), dtype, 0.5, 2, device),
          sparse((70000,), dtype, 0.1, 3, device), sparse((1001,), dtype, 0.3, 4, device)[3:]]  # off-alignment view
    got = _ops.count_zeros(ts)
    assert got.dtype == torch.int64 and got.dim() == 0 and got.device == device
    assert int(got) == seed_count(ts)


def test_negative_zero_nan_and_strides(backend, device):
    x = torch.tensor([0.0, -0.0, float('nan'), 1.0, -1.0, float('inf')], device=device)
    assert int(_ops.count_zeros([x, x.half(), x.bfloat16(), x.double()])) == 8
    big = sparse((64, 33), torch.float32, 0.4, 4, device)
    views = [big[:, ::2], big.t(), big[3:40], big.unsqueeze(0).expand(3, 64, 33)]
    assert int(_ops.count_zeros(views)) == seed_count(views)
    cl = sparse((4, 8, 5, 5), torch.float32, 0.3, 5, device).contiguous(memory_format=torch.channels_last)
    assert int(_ops.count_zeros([cl])) == seed_count([cl])


def test_empty(backend, device):
    assert int(_ops.count_zeros([])) == 0
    assert int(_ops.count_zeros([torch.empty(0, device=device), torch.zeros(3, device=device)])) == 3


def test_sparsity_matches_seed_value_and_type(backend, device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.Conv2d(16, 8, 1), nn.Linear(8, 4)).to(device)
    with torch.no_grad():
        model[0].weight[model[0].weight.abs() < 0.1] = 0
        model[1].bias.zero_()
    a, b = 0, 0
    for p in model.parameters():  # the seed's loop
        a += p.numel()
        b += (p == 0).sum()
    expected = b / a
    got = tx.sparsity(model)
    assert isinstance(got, torch.Tensor) and got.dim() == 0 and got.dtype == expected.dtype
    assert torch.equal(got, expected)


def test_prune_reaches_requested_sparsity(backend, device, capsys):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.Conv2d(16, 16, 3)).to(device)
    tx.prune(model, 0.3)
    convs = [m.weight for m in model if isinstance(m, nn.Conv2d)]
    for w in convs:
        assert abs(float((w == 0).float().mean()) - 0.3) < 0.01
    assert 'global sparsity' in capsys.readouterr().out
    model2 = nn.Sequential(nn.Conv2d(3, 16, 3), nn.Conv2d(16, 16, 3)).to(device)
    tx.prune(model2, 0.5, global_unstructured=True)
    total = sum(m.weight.numel() for m in model2)
    zeros = sum(int((m.weight == 0).sum()) for m in model2)
    assert abs(zeros / total - 0.5) < 0.01
    with pytest.raises(ValueError):
        tx.prune(model2, 1.5)


def test_opcheck_count(device):
    if not (_ops.COMPILED and _ops._has_kernel('count_zeros', device.type)):
        pytest.skip('compiled ops not built')
    ts = [sparse((100,), torch.float32, 0.3, 6, device), sparse((5, 5), torch.float16, 0.3, 7, device),
          torch.zeros(3, dtype=torch.int64, device=device)]
    torch.library.opcheck(torch.ops.torchutils_ext.count_zeros.default, (ts,))


@pytest.mark.parametrize('bad,exc', [(lambda d: [torch.zeros(3, device=d), None], TypeError),
                                     (lambda d: [torch.zeros(3, device=d), 'x'], TypeError),
                                     (lambda d: [torch.zeros(3, device=d), torch.zeros(2, device='meta')], ValueError),
                                     (lambda d: torch.zeros(3, device=d), TypeError)])
def test_count_bad_input(backend, device, bad, exc):
    with pytest.raises(exc):
        _ops.count_zeros(bad(device))
