"""FSDP2 (fully_shard) on CPU/gloo, 2 processes: ModelEMA updates the local shards of DTensor parameters, with
no collective inside update(), and ends equal to a single-process EMA of the same training."""
import pytest
import torch
import torch.nn as nn
from gloo_helpers import close_gloo, init_gloo, run_workers
from seed_oracle import SeedEMA

import torchutils_ext as tx

fsdp = pytest.importorskip('torch.distributed.fsdp', reason='torch built without distributed')
if not hasattr(fsdp, 'fully_shard'):  # public since torch 2.6; this project supports 2.11+
    pytest.skip(f'torch {torch.__version__} has no torch.distributed.fsdp.fully_shard', allow_module_level=True)

WORLD, STEPS, TIMEOUT_S = 2, 4, 120


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def _batches():
    g = torch.Generator().manual_seed(7)
    return [torch.randn(WORLD * 8, 6, generator=g) for _ in range(STEPS)]


def _train(model, ema, batches, rank=None):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x in batches:
        if rank is not None:
            x = x[rank * 8:(rank + 1) * 8]  # each rank its half; FSDP averages gradients like DDP
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update(model)


class _Both:
    def __init__(self, *emas):
        self.emas = emas

    def update(self, model):
        for e in self.emas:
            e.update(model)


def _profile():
    return torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])


def _collectives(prof):
    """Names of collective ops (c10d / gloo gathers, reduces, broadcasts) the profiler recorded."""
    keys = ('c10d', 'gloo', 'gather', 'all_reduce', 'allreduce', 'broadcast', 'reduce_scatter')
    return {e.name for e in prof.events() if any(k in e.name.lower() for k in keys)}


def _worker(rank, port, out):
    init_gloo(rank, WORLD, port)
    ok = False
    try:
        model = _net()
        model[1].eval()  # BN statistics of one rank's half would differ from the full batch's
        ema = tx.ModelEMA(model, decay=0.9, tau=1.0)
        for m in (model, ema.ema):
            fsdp.fully_shard(m)
        try:
            tx.ModelEMA(model)
            refused = ''
        except TypeError as e:
            refused = str(e)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        in_forward, in_update = set(), set()
        for x in _batches():
            x = x[rank * 8:(rank + 1) * 8]
            with _profile() as prof:
                loss = model(x).pow(2).mean()
            in_forward |= _collectives(prof)
            opt.zero_grad()
            loss.backward()
            opt.step()
            with _profile() as prof:
                ema.update(model)
            in_update |= _collectives(prof)
        local_types = {type(p).__name__ for p in ema.ema.parameters()}
        full = {k: (v.full_tensor() if hasattr(v, 'full_tensor') else v).clone()
                for k, v in ema.ema.state_dict().items()}
        if rank == 0:
            torch.save({'refused': refused, 'in_update': in_update, 'in_forward': in_forward,
                        'types': local_types, 'ema': full, 'updates': ema.updates}, out)
        ok = True
    finally:
        close_gloo(ok)


@pytest.mark.slow
def test_model_ema_on_fully_sharded_model(tmp_path):
    out = str(tmp_path / 'rank0.pt')
    run_workers(_worker, (out,), WORLD, TIMEOUT_S, 'FSDP')
    got = torch.load(out)
    assert 'fully_shard' in got['refused']  # ModelEMA of an already-sharded model: a clear TypeError
    assert got['types'] == {'DTensor'} and got['updates'] == STEPS
    assert got['in_forward'], 'the profiler should see FSDP gather the shards in forward'
    assert not got['in_update'], f"ModelEMA.update ran collectives: {got['in_update']}"  # local shards only

    model = _net()
    model[1].eval()
    ours, seed = tx.ModelEMA(model, decay=0.9, tau=1.0), SeedEMA(model, decay=0.9, tau=1.0)
    _train(model, _Both(ours, seed), _batches())
    for k, v in ours.ema.state_dict().items():
        assert torch.equal(v, seed.ema.state_dict()[k]), k  # single process: the seed's bits
    for k, v in seed.ema.state_dict().items():
        torch.testing.assert_close(got['ema'][k], v, rtol=1e-5, atol=1e-6, msg=lambda m: f'{k}: {m}')
