"""The seed's training helpers run beside ours on the same input (test_training.py checks our own restatements
and the YOLOv5 extras): initialize_weights, smart_optimizer's grouping, EarlyStopping; and device_count on a
CUDA build of torch."""
import random

import pytest
import torch
import torch.nn as nn

import seed_api as seed
import torchutils_ext as tx
from torchutils_ext import device as device_mod


class MyBN(nn.BatchNorm2d):
    pass


class MySiLU(nn.SiLU):
    pass


class Scaled(nn.Module):  # a custom layer with its own weight and bias Parameters
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(3))
        self.bias = nn.Parameter(torch.zeros(3))


def zoo():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), MyBN(3), nn.BatchNorm1d(3), nn.SyncBatchNorm(3),
        nn.GroupNorm(1, 3), nn.InstanceNorm2d(3, affine=True), nn.LayerNorm(3), nn.Linear(3, 3, bias=False),
        nn.Hardswish(), nn.LeakyReLU(), nn.ReLU(), nn.ReLU6(), nn.SiLU(), MySiLU(), nn.GELU(), nn.Mish(),
        nn.PReLU(), nn.Embedding(4, 3), Scaled())


def settings(model):
    return [(type(m).__name__, getattr(m, 'eps', None), getattr(m, 'momentum', None), getattr(m, 'inplace', None))
            for m in model.modules()]


def test_initialize_weights_as_the_seed():
    ours, theirs = zoo(), zoo()
    tx.initialize_weights(ours)
    seed.initialize_weights(theirs)
    assert settings(ours) == settings(theirs)
    assert (ours[2].eps, ours[2].momentum, ours[14].inplace) == (1e-5, 0.1, False)  # exact types only, as the seed
    assert (ours[1].eps, ours[1].momentum, ours[13].inplace) == (1e-3, 0.03, True)
    sa, sb = ours.state_dict(), theirs.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # weights keep torch's init


@pytest.mark.parametrize('name', ['Adam', 'AdamW', 'RMSProp', 'SGD'])
def test_smart_optimizer_groups_as_the_seed(name):
    model = zoo()
    opt = tx.smart_optimizer(model, name, lr=0.01, momentum=0.8, decay=1e-4)
    decayed, norm, bias = seed.optimizer_groups(model)
    got = [[id(p) for p in g['params']] for g in opt.param_groups]
    assert got == [[id(p) for p in g] for g in (bias, decayed, norm)]  # same groups, same order
    assert [g['weight_decay'] for g in opt.param_groups] == [0.0, 1e-4, 0.0]


def fitness_runs():
    rng = random.Random(0)
    runs = [[0.0] * 6, [0.1, 0.2, 0.2, 0.1, 0.2, 0.0, 0.0, 0.0, 0.3]]
    for _ in range(20):
        runs.append([round(rng.random(), 1) for _ in range(rng.randint(1, 40))])  # ties are common at 0.1 steps
    return runs


@pytest.mark.parametrize('patience', [0, None, 1, 2, 5, 30, 'default'])
def test_early_stopping_as_the_seed(patience):
    for fitness in fitness_runs():
        ours = tx.EarlyStopping() if patience == 'default' else tx.EarlyStopping(patience)
        theirs = seed.EarlyStopping() if patience == 'default' else seed.EarlyStopping(patience)
        for epoch, f in enumerate(fitness):
            assert ours(epoch, f) == theirs(epoch, f), (fitness, epoch)
            assert (ours.best_fitness, ours.best_epoch, ours.possible_stop, ours.patience) == (
                theirs.best_fitness, theirs.best_epoch, theirs.possible_stop, theirs.patience)


def test_device_count_on_a_cuda_build(monkeypatch):
    """A CUDA build answers with torch.cuda.device_count() (NVML-based, honours CUDA_VISIBLE_DEVICES); NVML through
    nvidia-ml-py only when torch cannot answer."""
    monkeypatch.setattr(device_mod, '_torch_cuda_built', lambda: True)
    monkeypatch.setattr(device_mod, '_nvml_count', lambda: 4)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 3)
    assert tx.device_count() == 3

    def broken():
        raise RuntimeError('driver too old')
    monkeypatch.setattr(torch.cuda, 'device_count', broken)
    assert tx.device_count() == 4
    monkeypatch.setattr(device_mod, '_nvml_count', lambda: None)
    assert tx.device_count() == 0


@pytest.mark.parametrize('system', ['Darwin', 'Linux', 'Windows'])
def test_device_count_on_any_os(monkeypatch, system):
    """The seed asserts Linux or Windows and shells out to nvidia-smi; ours asks torch or NVML on any OS."""
    import platform
    monkeypatch.setattr(platform, 'system', lambda: system)
    monkeypatch.setattr(device_mod, '_torch_cuda_built', lambda: False)
    monkeypatch.setattr(device_mod, '_nvml_count', lambda: 2)
    assert tx.device_count() == 2
