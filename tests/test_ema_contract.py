"""ModelEMA's constructor contract, through the public API and beside the seed's ModelEMA: ``updates=N`` starts
the count and the decay ramp at N, the EMA copy is in eval mode, a deep copy (or a pickle) keeps the skipped-step
count, and non-persistent buffers are left alone, as the seed's walk over state_dict() leaves them."""
import copy
import functools
import io
import pickle

import pytest
import torch
import torch.nn as nn
from seed_oracle import SeedModelEMA, seed_decay

import torchutils_ext as tx


class WithScratch(nn.Module):
    """A layer with non-persistent buffers (not in state_dict): a float cache and an int counter."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.register_buffer('cache', torch.zeros(4), persistent=False)
        self.register_buffer('calls', torch.zeros((), dtype=torch.int64), persistent=False)
        self.register_buffer('scale', torch.ones(4))  # persistent: averaged

    def forward(self, x):
        y = self.conv(x) * self.scale.view(-1, 1, 1)
        self.cache = y.detach().mean((0, 2, 3))
        self.calls += 1
        return y


def net():
    torch.manual_seed(0)
    return nn.Sequential(WithScratch(), nn.BatchNorm2d(4), nn.SiLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))


def train(model, emas, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(2, 3, 6, 6, generator=g)).square().mean().backward()
        opt.step()
        with torch.no_grad():
            model[0].scale.mul_(1.5)
        for e in emas:
            e.update(model)


def all_tensors(module):
    """Every parameter and buffer, persistent or not, by name."""
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def same_tensors(a, b):
    ta, tb = all_tensors(a), all_tensors(b)
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.mark.parametrize('capturable', [False, True])
def test_updates_n_keeps_the_count_and_the_ramp(backend, capturable):
    model = net()
    ours = tx.ModelEMA(model, tau=4, updates=7, capturable=capturable)
    theirs = SeedModelEMA(model, tau=4, updates=7)
    assert ours.updates == 7 and type(ours.updates) is int
    train(model, [ours, theirs], 3)
    assert ours.updates == theirs.updates == 10
    assert same_tensors(ours.ema, theirs.ema)  # each step took decay(8), decay(9), decay(10), as the seed
    fresh = tx.ModelEMA(net(), tau=4, capturable=capturable)
    train(net(), [fresh], 3)
    assert not same_tensors(fresh.ema, ours.ema)  # the case tells a ramp started at 7 from one started at 0
    assert ours.decay(10) == seed_decay(10, tau=4)


@pytest.mark.parametrize('wrap', [False, True])
def test_the_ema_copy_is_in_eval_mode(backend, wrap):
    model = net().train()
    ours = tx.ModelEMA(nn.DataParallel(model) if wrap else model)
    theirs = SeedModelEMA(model)
    assert model.training and all(m.training for m in model.modules())  # the model is left training
    assert not any(m.training for m in ours.ema.modules())
    assert [m.training for m in ours.ema.modules()] == [m.training for m in theirs.ema.modules()]
    train(model, [ours], 2)
    assert not any(m.training for m in ours.ema.modules())
    bn = ours.ema[1]
    stats = bn.running_mean.clone(), int(bn.num_batches_tracked)
    ours.ema(torch.randn(2, 3, 6, 6))  # validation on the EMA leaves its BN statistics alone
    assert torch.equal(bn.running_mean, stats[0]) and int(bn.num_batches_tracked) == stats[1]


def poison(model):
    with torch.no_grad():
        model[4].weight[0, 0] = float('nan')


@pytest.mark.parametrize('capturable', [False, True])
def test_deepcopy_after_a_skipped_step_keeps_skipped(backend, capturable):
    model = net()
    ema = tx.ModelEMA(model, skip_nonfinite=True, capturable=capturable)
    train(model, [ema], 2)
    clean = copy.deepcopy(model)
    poison(model)
    ema.update(model)
    assert (ema.skipped, ema.updates) == (1, 3)
    twin = copy.deepcopy(ema)
    assert (twin.skipped, twin.updates) == (1, 3) and same_tensors(twin.ema, ema.ema)
    twin.update(model)  # the copy's count goes on from 1, on its own tensor
    assert (twin.skipped, ema.skipped) == (2, 1)
    ema.update(model)
    twin.update(clean)
    ema.update(clean)
    assert twin.updates == ema.updates == 5 and same_tensors(twin.ema, ema.ema)


class RampPickler(pickle.Pickler):
    """Plain pickle refuses the seed's ``decay`` lambda (ours keeps it, as the seed); this pickler stores such a
    lambda by its closure, (decay, tau), as cloudpickle would, so the rest of ModelEMA goes through pickle."""

    def reducer_override(self, obj):
        if getattr(obj, '__name__', '') == '<lambda>' and obj.__code__.co_freevars == ('decay', 'tau'):
            return ramp, tuple(c.cell_contents for c in obj.__closure__)
        return NotImplemented


def ramp(decay, tau):
    return functools.partial(seed_decay, decay=decay, tau=tau)


def test_pickle_after_a_skipped_step_keeps_skipped(backend):
    model = net()
    ema = tx.ModelEMA(model, tau=4, skip_nonfinite=True)
    train(model, [ema], 1)
    clean = copy.deepcopy(model)
    poison(model)
    ema.update(model)
    buf = io.BytesIO()
    RampPickler(buf).dump(ema)
    back = pickle.loads(buf.getvalue())
    assert (back.skipped, back.updates, back.skip_nonfinite) == (1, 2, True)
    assert back.decay(7) == ema.decay(7)
    back.update(clean)
    ema.update(clean)
    assert back.updates == 3 and back.skipped == 1 and same_tensors(back.ema, ema.ema)


@pytest.mark.parametrize('copy_buffers', [False, True])
def test_non_persistent_buffers_are_left_alone(backend, copy_buffers):
    model = net()
    ours, theirs = tx.ModelEMA(model, tau=2, copy_buffers=copy_buffers), SeedModelEMA(model, tau=2)
    start = ours.ema[0].cache.clone(), int(ours.ema[0].calls)
    train(model, [ours, theirs], 3)
    assert int(model[0].calls) == 3 and not torch.equal(model[0].cache, start[0])  # the model's did change
    assert torch.equal(ours.ema[0].cache, start[0]) and int(ours.ema[0].calls) == start[1]
    assert not torch.equal(ours.ema[0].scale, torch.ones(4))  # the persistent one is averaged
    if copy_buffers:  # the persistent int buffer (BN's count) is copied, the non-persistent one is not
        assert int(ours.ema[1].num_batches_tracked) == 3
    else:
        assert same_tensors(ours.ema, theirs.ema)
