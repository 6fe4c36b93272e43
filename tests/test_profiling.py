"""profile() row layout and model_info() FLOPs: FlopCounterMode without thop, thop MACs x 2 with it."""
import logging
import math
import sys
import types

import pytest
import torch
import torch.nn as nn

from torchutils_ext import model_info, profile


@pytest.fixture
def log(caplog):
    caplog.set_level(logging.INFO, logger='torchutils_ext')
    return caplog


@pytest.fixture
def no_thop(monkeypatch):
    monkeypatch.setitem(sys.modules, 'thop', None)  # makes `import thop` raise ImportError


@pytest.fixture
def fake_thop(monkeypatch):
    mod = types.ModuleType('thop')
    mod.calls = 0

    def fake_profile(model, inputs, verbose=False):
        mod.calls += 1
        return 1.5e9, 0  # MACs, params
    mod.profile = fake_profile
    monkeypatch.setitem(sys.modules, 'thop', mod)
    return mod


def tiny():
    # conv(3->64, 3x3, pad 1) -> BN -> SiLU -> conv(64->128, 3x3, stride 2, pad 1): no biases, so the only
    # FLOPs FlopCounterMode counts are the two convolutions
    return nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.SiLU(),
                         nn.Conv2d(64, 128, 3, 2, 1, bias=False))


def conv_macs(s):
    # analytic multiply-accumulates of tiny() at an s x s input
    s2 = math.ceil(s / 2)
    return s * s * 64 * 3 * 9 + s2 * s2 * 128 * 64 * 9


def test_model_info_flopcounter_matches_analytic(no_thop, log):
    m = tiny()
    model_info(m, img_size=640)
    gflops = conv_macs(32) * 2 / 1e9 * (640 / 32) ** 2
    n_p = sum(p.numel() for p in m.parameters())
    assert log.records[-1].getMessage() == (f'Model summary: 5 layers, {n_p} parameters, {n_p} gradients, '
                                            f'{gflops:.1f} GFLOPs')
    assert f'{gflops:.1f}' == '16.5'


def test_model_info_rect_size_stride_yaml(no_thop, log):
    m = nn.Sequential(nn.Conv2d(1, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.SiLU(),
                      nn.Conv2d(64, 128, 3, 2, 1, bias=False))
    m.yaml = {'ch': 1}  # a one-channel model: the seed would read ch from yaml
    m.stride = torch.tensor([8., 64.])
    m.yaml_file = 'models/yolov5s.yaml'
    m[0].weight.requires_grad_(False)
    model_info(m, img_size=[640, 320])
    s = 64
    macs = s * s * 64 * 1 * 9 + (s // 2) ** 2 * 128 * 64 * 9
    gflops = macs * 2 / 1e9 * (640 / s) * (320 / s)
    n_p = sum(p.numel() for p in m.parameters())
    n_g = n_p - m[0].weight.numel()
    assert log.records[-1].getMessage() == (f'YOLOv5s summary: 5 layers, {n_p} parameters, {n_g} gradients, '
                                            f'{gflops:.1f} GFLOPs')


def test_model_info_leaves_model_untouched(no_thop):
    m = tiny().train()
    before = m[1].running_mean.clone()
    model_info(m)
    assert m.training and torch.equal(m[1].running_mean, before) and m[1].num_batches_tracked == 0


def test_model_info_uses_thop_macs_times_two(fake_thop, log):
    model_info(tiny(), img_size=64)
    assert fake_thop.calls == 1
    assert log.records[-1].getMessage().endswith(f', {1.5 * 2 * 4:.1f} GFLOPs')


def test_model_info_flops_failure_is_silent(no_thop, log):
    m = nn.Sequential(nn.Linear(5, 2))  # cannot take an image: no GFLOPs, no crash
    model_info(m)
    assert log.records[-1].getMessage() == 'Model summary: 2 layers, 12 parameters, 12 gradients'


def test_model_info_verbose_table(no_thop, capsys):
    model_info(tiny(), verbose=True)
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ['layer', 'name', 'gradient', 'parameters', 'shape', 'mu', 'sigma']
    assert len(out) == 1 + 4  # two conv weights, BN weight and bias
    assert out[1].split()[:4] == ['0', '0.weight', 'True', '1728']


def test_profile_rows(no_thop, capsys):
    x = torch.rand(2, 3, 16, 16)
    ops = [tiny(), lambda t: t * torch.sigmoid(t), nn.Linear(7, 2)]  # the last one fails on this input
    res = profile(x, ops, n=2, device='cpu')
    p, flops, mem, tf, tb, s_in, s_out = res[0]
    assert p == sum(q.numel() for q in ops[0].parameters())
    assert flops == pytest.approx(conv_macs(16) * 2 * 2 / 1e9)  # batch of 2
    assert mem == 0 and tf >= 0 and tb >= 0
    assert (s_in, s_out) == ((2, 3, 16, 16), (2, 128, 8, 8))
    assert res[1][0] == 0 and res[1][1] == 0 and res[1][6] == (2, 3, 16, 16)
    assert res[2] is None
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ['Params', 'GFLOPs', 'GPU_mem', '(GB)', 'forward', '(ms)', 'backward', '(ms)', 'input',
                              'output']


def test_profile_list_input_and_no_backward(no_thop):
    xs = [torch.rand(1, 4), torch.rand(3, 4)]
    res = profile(xs, nn.Linear(4, 2), n=1, device=torch.device('cpu'))
    assert [r[5] for r in res] == [(1, 4), (3, 4)]
    res = profile(torch.rand(1, 4), lambda t: [t * 2, t], n=1, device='cpu')  # list output: summed backward
    assert res[0][6] == 'list' and not math.isnan(res[0][4])
    res = profile(torch.rand(1, 4), lambda t: t.detach().argmax(), n=1, device='cpu')  # no backward
    assert math.isnan(res[0][4]) and res[0][6] == ()


def test_profile_thop_macs_times_two(fake_thop):
    res = profile(torch.rand(1, 4), nn.Linear(4, 2), n=1, device='cpu')
    assert res[0][1] == pytest.approx(3.0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA for event timing')
def test_profile_cuda_events():
    res = profile(torch.rand(2, 3, 32, 32), tiny(), n=3, device=torch.device('cuda:0'))
    assert res[0] is not None and res[0][3] > 0 and res[0][2] > 0
