"""What profile() and model_info() return (test_profiling.py checks their printed and logged lines): profile's
forward/backward times are the mean over the n timed runs, after one warm-up run (a fake clock makes every
duration known), and model_info's tuple counts what the seed counts, on a model with frozen parameters."""
import logging
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

import seed_api as seed
from torchutils_ext import model_info, profile
from torchutils_ext import profiling


@pytest.fixture
def no_thop(monkeypatch):
    monkeypatch.setitem(sys.modules, 'thop', None)  # FLOPs from FlopCounterMode


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def perf_counter(self):
        return self.now


class Timed(nn.Module):
    """Each forward call advances the clock by the next entry of `fwd`; the backward of that call (a hook on the
    output) by the matching entry of `bwd`. Calls without autograd (the FLOPs count) take a forward entry only."""

    def __init__(self, clock, fwd, bwd):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))
        self.clock, self.fwd, self.bwd, self.calls, self.backwards = clock, list(fwd), list(bwd), 0, 0

    def forward(self, x):
        self.clock.now += self.fwd[self.calls]
        self.calls += 1
        y = x * self.w
        if y.requires_grad:
            y.register_hook(self._backward)
        return y

    def _backward(self, grad):
        self.clock.now += self.bwd[self.backwards]
        self.backwards += 1


def test_profile_returns_the_mean_of_the_timed_runs(no_thop, monkeypatch, capsys):
    clock = FakeClock()
    monkeypatch.setattr(profiling, 'time', SimpleNamespace(perf_counter=clock.perf_counter))
    # forward: FLOPs count, warm-up, then 4 timed runs; backward: warm-up, then 4 timed runs (seconds)
    op = Timed(clock, fwd=[50.0, 70.0, 0.001, 0.002, 0.003, 0.006], bwd=[90.0, 0.010, 0.020, 0.030, 0.040])
    (row,) = profile(torch.rand(2, 3), op, n=4, device='cpu')
    p, flops, mem, tf, tb, s_in, s_out = row
    assert op.calls == 6 and op.backwards == 5  # the FLOPs count and the warm-up ran, and are not timed
    assert tf == pytest.approx((1 + 2 + 3 + 6) / 4, rel=1e-9)  # ms: the mean of the 4 timed forwards
    assert tb == pytest.approx((10 + 20 + 30 + 40) / 4, rel=1e-9)
    assert (p, mem, s_in, s_out) == (1, 0, (2, 3), (2, 3))
    line = capsys.readouterr().out.splitlines()[-1].split()
    assert [float(v) for v in line[3:5]] == [pytest.approx(3.0), pytest.approx(25.0)]


def test_profile_means_per_input_and_op(no_thop, monkeypatch, capsys):
    clock = FakeClock()
    monkeypatch.setattr(profiling, 'time', SimpleNamespace(perf_counter=clock.perf_counter))
    a = Timed(clock, fwd=[0, 9, 0.002, 0.004] * 2, bwd=[9, 0.001, 0.001] * 2)
    b = Timed(clock, fwd=[0, 9, 0.010, 0.030] * 2, bwd=[9, 0.005, 0.007] * 2)
    rows = profile([torch.rand(1, 2), torch.rand(3, 2)], [a, b], n=2, device='cpu')
    assert [(r[3], r[4]) for r in rows] == [(pytest.approx(3.0), pytest.approx(1.0)),
                                            (pytest.approx(20.0), pytest.approx(6.0))] * 2
    assert [r[5] for r in rows] == [(1, 2), (1, 2), (3, 2), (3, 2)]


def frozen_net():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.SiLU(),
                      nn.Sequential(nn.Conv2d(8, 8, 1), nn.ReLU()), nn.Conv2d(8, 8, 1))
    m[0].weight.requires_grad_(False)  # a frozen backbone layer, as train.py --freeze leaves it
    m[1].bias.requires_grad_(False)
    m[4].weight = m[3][0].weight  # tied: counted once, as model.parameters() yields it once
    return m


def test_model_info_tuple_on_frozen_parameters(no_thop, caplog):
    m = frozen_net()
    with caplog.at_level(logging.INFO, logger='torchutils_ext'):
        n_l, n_p, n_g, gflops = model_info(m, img_size=64)
    layers, seed_p, seed_g = seed.model_info_counts(m)
    assert (n_p, n_g) == (seed_p, seed_g) == (8 * 27 + 16 + 72 + 8, 8 + 72 + 8)
    assert n_l == 6  # leaf modules (Ultralytics' count); the logged line keeps the seed's count of all modules
    assert type(gflops) is float and gflops > 0
    line = caplog.records[-1].getMessage()
    assert line == f'Model summary: {layers} layers, {seed_p} parameters, {seed_g} gradients, {gflops:.1f} GFLOPs'
    assert not any(p.requires_grad for p in (m[0].weight, m[1].bias))  # the count froze or thawed nothing


def test_model_info_tuple_without_flops(no_thop):
    m = nn.Sequential(nn.Linear(5, 2), nn.Linear(2, 2))
    m[1].requires_grad_(False)
    assert model_info(m) == (2, 18, 12, 0.0)  # no image input: GFLOPs 0.0, as Ultralytics returns it
