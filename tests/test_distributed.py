"""DDP helpers: a real 2-process gloo run on CPU, plus no-process-group and nccl-argument checks."""
import os
import time
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from gloo_helpers import close_gloo, init_gloo, run_workers
from seed_oracle import SeedEMA

import torchutils_ext
from torchutils_ext import de_parallel, is_parallel, smart_DDP, torch_distributed_zero_first
from torchutils_ext import distributed as dist_mod

WORLD = 2
TIMEOUT_S = 90


def _net():
    torch.manual_seed(0)  # same init on every rank; DDP also broadcasts rank 0's weights
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))


def _batches(steps=3):
    g = torch.Generator().manual_seed(100)
    return [torch.randn(WORLD * 16, 4, generator=g) for _ in range(steps)]


def _worker(rank, port, tmp):
    init_gloo(rank, WORLD, port)
    ok = False
    try:
        log = os.path.join(tmp, 'order.log')
        # zero_first: rank 0 lingers inside the block; without the barrier rank 1 would write first
        with torch_distributed_zero_first(rank):
            with open(log, 'a') as f:
                f.write(f'{rank} enter {time.time():.6f}\n')
            if rank == 0:
                time.sleep(0.5)
            with open(log, 'a') as f:
                f.write(f'{rank} exit {time.time():.6f}\n')

        model = _net()
        ddp = smart_DDP(model)
        ok = is_parallel(ddp) and de_parallel(ddp) is model and ddp.device_ids is None
        ema = torchutils_ext.ModelEMA(ddp, decay=0.9, tau=1.0)  # unwraps DDP, as train.py passes it
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        for x in _batches():
            loss = ddp(x[rank * 16:(rank + 1) * 16]).pow(2).mean()  # each rank its half of the batch
            opt.zero_grad()
            loss.backward()
            opt.step()
            ema.update(ddp)
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        ema_flat = torch.cat([p.detach().flatten() for p in ema.ema.parameters()])
        torch.save({'ok': ok, 'params': flat, 'ema': ema_flat, 'updates': ema.updates},
                   os.path.join(tmp, f'rank{rank}.pt'))
        ok = True
    finally:
        close_gloo(ok)


@pytest.mark.slow
def test_two_process_gloo(tmp_path):
    run_workers(_worker, (str(tmp_path),), WORLD, TIMEOUT_S, 'gloo')
    lines = (tmp_path / 'order.log').read_text().split()
    events = [(lines[i], lines[i + 1], float(lines[i + 2])) for i in range(0, len(lines), 3)]
    assert [e[:2] for e in events] == [('0', 'enter'), ('0', 'exit'), ('1', 'enter'), ('1', 'exit')]
    assert events[2][2] >= events[1][2]  # rank 1 entered only after rank 0 left
    r0, r1 = (torch.load(tmp_path / f'rank{r}.pt') for r in range(WORLD))
    assert r0['ok'] and r1['ok']
    init = torch.cat([p.detach().flatten() for p in _net().parameters()])
    assert not torch.equal(r0['params'], init)  # the steps changed the weights
    assert torch.allclose(r0['params'], r1['params'], atol=1e-6)  # and all-reduced grads kept ranks in sync
    # single-process reference: the whole batch at once (DDP averages the two halves' gradients)
    model = _net()
    ema, seed = torchutils_ext.ModelEMA(model, decay=0.9, tau=1.0), SeedEMA(model, decay=0.9, tau=1.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x in _batches():
        loss = (model(x[:16]).pow(2).mean() + model(x[16:]).pow(2).mean()) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update(model)
        seed.update(model)
    ref = torch.cat([p.detach().flatten() for p in seed.ema.parameters()])
    assert torch.equal(ref, torch.cat([p.detach().flatten() for p in ema.ema.parameters()]))
    assert r0['updates'] == r1['updates'] == ema.updates == 3
    assert not torch.allclose(ref, init, atol=1e-3)  # the EMA moved
    torch.testing.assert_close(r0['ema'], ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(r1['ema'], ref, rtol=1e-5, atol=1e-6)


# ---- no process group -------------------------------------------------------------------------------------

def test_helpers_without_process_group():
    assert not dist.is_initialized()
    for r in (-1, 0, 1, 3):
        with torch_distributed_zero_first(r):
            pass
    with pytest.raises(RuntimeError, match='process group'):
        smart_DDP(nn.Linear(2, 2))


def test_zero_first_releases_others_when_rank0_raises(monkeypatch):
    calls = []
    monkeypatch.setattr(dist_mod, '_pg_ready', lambda: True)
    monkeypatch.setattr(dist, 'get_backend', lambda *a: 'gloo')
    monkeypatch.setattr(dist, 'barrier', lambda **kw: calls.append(kw))
    with pytest.raises(KeyError):
        with torch_distributed_zero_first(0):
            raise KeyError('x')
    assert calls == [{}]


@pytest.mark.parametrize('backend, rank, expect', [
    ('nccl', 1, [{'device_ids': [1]}]), ('nccl', 0, [{'device_ids': [0]}]), ('gloo', 2, [{}]),
    ('gloo', 0, [{}]), ('nccl', -1, [])])
def test_zero_first_barrier_arguments(monkeypatch, backend, rank, expect):
    calls = []
    monkeypatch.setattr(dist_mod, '_pg_ready', lambda: True)
    monkeypatch.setattr(dist, 'get_backend', lambda *a: backend)
    monkeypatch.setattr(dist, 'barrier', lambda **kw: calls.append(kw))
    with torch_distributed_zero_first(rank):
        pass
    assert calls == expect


class _FakeModel:
    def __init__(self, device):
        self.device = torch.device(device)

    def parameters(self):
        return iter([SimpleNamespace(device=self.device)])


@pytest.mark.parametrize('backend, device, expect', [
    ('nccl', 'cuda:1', {'device_ids': [1], 'output_device': 1, 'static_graph': True}),
    ('gloo', 'cuda:1', {'static_graph': True}),
    ('gloo', 'cpu', {'static_graph': True}),
    ('nccl', 'cpu', {'static_graph': True})])
def test_smart_ddp_arguments(monkeypatch, backend, device, expect):
    seen = {}
    monkeypatch.setattr(dist_mod, '_pg_ready', lambda: True)
    monkeypatch.setattr(dist, 'get_backend', lambda *a: backend)
    monkeypatch.setattr(dist_mod, 'DDP', lambda model, **kw: seen.update(kw) or 'wrapped')
    assert smart_DDP(_FakeModel(device)) == 'wrapped'
    assert seen == expect


def test_smart_ddp_refuses_torch_1_12_0(monkeypatch):
    monkeypatch.setattr(dist_mod, '_pg_ready', lambda: True)
    monkeypatch.setattr(torch, '__version__', '1.12.0+cu113')
    with pytest.raises(RuntimeError, match='8395'):
        smart_DDP(_FakeModel('cpu'))


def test_is_parallel_de_parallel():
    m = nn.Linear(2, 2)
    dp = nn.DataParallel(m)
    assert is_parallel(dp) and de_parallel(dp) is m
    assert not is_parallel(m) and de_parallel(m) is m


def test_env_ranks():
    assert (torchutils_ext.LOCAL_RANK, torchutils_ext.RANK, torchutils_ext.WORLD_SIZE) == (
        int(os.getenv('LOCAL_RANK', -1)), int(os.getenv('RANK', -1)), int(os.getenv('WORLD_SIZE', 1)))
