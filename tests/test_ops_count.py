"""count_zeros and sparsity: every dtype, -0.0, strides, parity with the seed's loop, opcheck."""
import pytest
import torch
import torch.nn as nn

import torchutils_ext as tx
from torchutils_ext import _ops

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.uint8, torch.int16,
          torch.int32, torch.int64, torch.bool, torch.complex64]


def sparse(shape, dtype, frac, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 10
    x[torch.rand(shape, generator=g) < frac] = 0
    return x.to(dtype)


def seed_count(ts):
    return sum(int((t == 0).sum()) for t in ts)


@pytest.mark.parametrize('dtype', DTYPES)
def test_count_zeros_every_dtype(backend, dtype):
    ts = [sparse((1000,), dtype, 0.3, 1), sparse((7, 9, 3), dtype, 0.5, 2), sparse((70000,), dtype, 0.1, 3)]
    got = _ops.count_zeros(ts)
    assert got.dtype == torch.int64 and got.dim() == 0
    assert int(got) == seed_count(ts)


def test_negative_zero_nan_and_strides(backend):
    x = torch.tensor([0.0, -0.0, float('nan'), 1.0, -1.0, float('inf')])
    assert int(_ops.count_zeros([x, x.half(), x.bfloat16(), x.double()])) == 8
    big = sparse((64, 33), torch.float32, 0.4, 4)
    views = [big[:, ::2], big.t(), big[3:40], big.unsqueeze(0).expand(3, 64, 33)]
    assert int(_ops.count_zeros(views)) == seed_count(views)
    cl = sparse((4, 8, 5, 5), torch.float32, 0.3, 5).contiguous(memory_format=torch.channels_last)
    assert int(_ops.count_zeros([cl])) == seed_count([cl])


def test_empty(backend):
    assert int(_ops.count_zeros([])) == 0
    assert int(_ops.count_zeros([torch.empty(0), torch.zeros(3)])) == 3


def test_sparsity_matches_seed_value_and_type(backend):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.Conv2d(16, 8, 1), nn.Linear(8, 4))
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


def test_prune_reaches_requested_sparsity(backend, capsys):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.Conv2d(16, 16, 3))
    tx.prune(model, 0.3)
    convs = [m.weight for m in model if isinstance(m, nn.Conv2d)]
    for w in convs:
        assert abs(float((w == 0).float().mean()) - 0.3) < 0.01
    assert 'global sparsity' in capsys.readouterr().out
    model2 = nn.Sequential(nn.Conv2d(3, 16, 3), nn.Conv2d(16, 16, 3))
    tx.prune(model2, 0.5, global_unstructured=True)
    total = sum(m.weight.numel() for m in model2)
    zeros = sum(int((m.weight == 0).sum()) for m in model2)
    assert abs(zeros / total - 0.5) < 0.01
    with pytest.raises(ValueError):
        tx.prune(model2, 1.5)


def test_opcheck_count():
    if not _ops.COMPILED:
        pytest.skip('compiled ops not built')
    ts = [sparse((100,), torch.float32, 0.3, 6), sparse((5, 5), torch.float16, 0.3, 7), torch.zeros(3, dtype=torch.int64)]
    torch.library.opcheck(torch.ops.torchutils_ext.count_zeros.default, (ts,))


@pytest.mark.parametrize('bad,exc', [([torch.zeros(3), None], TypeError), ([torch.zeros(3), 'x'], TypeError),
                                     ([torch.zeros(3), torch.zeros(2, device='meta')], ValueError),
                                     (torch.zeros(3), TypeError)])
def test_count_bad_input(backend, bad, exc):
    with pytest.raises(exc):
        _ops.count_zeros(bad)
