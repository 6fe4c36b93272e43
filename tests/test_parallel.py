"""is_parallel / de_parallel / smart_DDP / torch_distributed_zero_first and ModelEMA on a real DDP wrapper, in a
one-process gloo group (fast; the two-process run is test_distributed.py's slow test), beside the seed's code."""
import datetime

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from seed_oracle import SeedModelEMA

import seed_api as seed
import torchutils_ext as tx


@pytest.fixture
def gloo(monkeypatch):
    if not dist.is_available():
        pytest.skip('torch.distributed is not built into this torch')
    assert not dist.is_initialized()
    monkeypatch.setenv('GLOO_SOCKET_IFNAME', 'lo')
    dist.init_process_group('gloo', store=dist.HashStore(), rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=30))
    try:
        yield
    finally:
        dist.destroy_process_group()


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.SiLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))


class MyDDP(nn.parallel.DistributedDataParallel):
    pass


def test_smart_ddp_wraps_in_real_ddp(gloo):
    model = net()
    ddp = tx.smart_DDP(model)
    assert type(ddp) is nn.parallel.DistributedDataParallel
    assert ddp.module is model and ddp.device_ids is None  # CPU model: no device_ids (gloo refuses them)
    assert ddp.static_graph  # the seed's static_graph=True on torch >= 1.11
    assert tx.is_parallel(ddp) is seed.is_parallel(ddp) is True
    assert tx.de_parallel(ddp) is seed.de_parallel(ddp) is model
    ddp(torch.randn(2, 3, 6, 6)).sum().backward()  # a working wrapper: forward, all-reduced backward
    assert model[0].weight.grad is not None


def test_is_parallel_follows_the_seed_on_every_wrapper(gloo):
    model = net()
    cases = [model, nn.DataParallel(model), nn.parallel.DistributedDataParallel(model), MyDDP(model),
             torch.nn.Sequential(model)]
    for m in cases:
        assert tx.is_parallel(m) is seed.is_parallel(m), type(m).__name__
        assert tx.de_parallel(m) is seed.de_parallel(m), type(m).__name__
    assert [tx.is_parallel(m) for m in cases] == [False, True, True, False, False]  # exact types, as the seed


def test_model_ema_unwraps_ddp_and_matches_the_seed(gloo, backend):
    model = net()
    ddp = tx.smart_DDP(model)
    ours, theirs = tx.ModelEMA(ddp, tau=2), SeedModelEMA(seed.de_parallel(ddp), tau=2)
    assert type(ours.ema) is nn.Sequential
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        opt.zero_grad()
        ddp(torch.randn(4, 3, 6, 6, generator=g)).square().mean().backward()
        opt.step()
        ours.update(ddp)
        theirs.update(model)
    a, b = ours.ema.state_dict(), theirs.ema.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b) and ours.updates == 3


def test_update_attr_default_exclude_on_ddp(gloo):
    """YOLOv5 calls ema.update_attr(model) with the DDP wrapper in some forks: the default exclude keeps DDP's
    process group and reducer off the EMA, as the seed's does; every other public attribute is copied."""
    ddp = tx.smart_DDP(net())
    assert {'process_group', 'reducer'} <= set(vars(ddp))  # the wrapper really holds both
    ema = tx.ModelEMA(net())
    ema.update_attr(ddp)
    ref = net()
    seed.update_attr(ref, ddp)
    assert set(vars(ema.ema)) == set(vars(ref))
    assert not hasattr(ema.ema, 'process_group') and not hasattr(ema.ema, 'reducer')
    assert ema.ema.static_graph is ddp.static_graph is True  # public attributes do come over
    ema.update_attr(ddp, exclude=())
    assert ema.ema.reducer is ddp.reducer  # exclude=() copies them: the default is what kept them off


def test_zero_first_in_a_real_group(gloo, monkeypatch):
    calls, barrier = [], dist.barrier
    monkeypatch.setattr(dist, 'barrier', lambda *a, **kw: calls.append(kw) or barrier(*a, **kw))
    ran = []
    for rank in (-1, 0):
        with tx.torch_distributed_zero_first(rank):
            ran.append(rank)
    assert ran == [-1, 0] and calls == [{}]  # rank 0 releases the others after its block; -1 never waits
