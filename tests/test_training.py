"""The seed's training helpers against our own re-statement of the seed's formulas, plus the YOLOv5 extras."""
import logging
import math
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import torchutils_ext
from torchutils_ext import (EarlyStopping, copy_attr, find_modules, initialize_weights, reshape_classifier_output,
                            scale_img, smart_amp_autocast, smart_hub_load, smart_inference_mode, smart_optimizer,
                            smart_resume, smartCrossEntropyLoss)


@pytest.fixture
def log(caplog):
    caplog.set_level(logging.INFO, logger='torchutils_ext')
    return caplog


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.SiLU(), nn.Conv2d(4, 4, 1),
                         nn.LeakyReLU(0.1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2),
                         nn.LayerNorm(2), nn.ReLU6())


# ---- initialize_weights / find_modules -------------------------------------------------------------------

def test_initialize_weights():
    m = nn.Sequential(net(), nn.BatchNorm1d(3), nn.Hardswish(), nn.ReLU())
    w = m[0][0].weight.clone()
    initialize_weights(m)
    bn, bn1 = m[0][1], m[1]
    assert (bn.eps, bn.momentum) == (1e-3, 0.03)
    assert (bn1.eps, bn1.momentum) == (1e-5, 0.1)  # only exact BatchNorm2d is touched
    assert all(a.inplace for a in (m[0][2], m[0][4], m[0][9], m[2], m[3]))
    assert torch.equal(m[0][0].weight, w)  # conv init left alone


def test_find_modules():
    m = SimpleNamespace(module_list=nn.ModuleList([nn.Conv2d(1, 1, 1), nn.ReLU(), nn.Conv2d(1, 1, 1), nn.Linear(1, 1)]))
    assert find_modules(m) == [0, 2]
    assert find_modules(m, mclass=nn.Linear) == [3]


# ---- scale_img ----------------------------------------------------------------------------------------------

def seed_scale_shape(h, w, ratio, same_shape, gs):
    s = (int(h * ratio), int(w * ratio))
    if same_shape:
        return (h, w), s
    return tuple(math.ceil(x * ratio / gs) * gs for x in (h, w)), s


@pytest.mark.parametrize('ratio, same, gs', [(0.5, False, 32), (0.83, False, 32), (0.67, True, 32),
                                             (1.3, False, 16), (0.5, True, 8)])
def test_scale_img(ratio, same, gs):
    img = torch.rand(2, 3, 256, 416)
    out = scale_img(img, ratio, same_shape=same, gs=gs)
    (H, W), (h, w) = seed_scale_shape(256, 416, ratio, same, gs)
    assert out.shape == (2, 3, H, W)
    ref = F.interpolate(img, size=(h, w), mode='bilinear', align_corners=False)
    assert torch.equal(out[..., :min(h, H), :min(w, W)], ref[..., :min(h, H), :min(w, W)])
    if H > h:
        assert torch.all(out[..., h:, :] == 0.447)
    if W > w:
        assert torch.all(out[..., :, w:] == 0.447)


def test_scale_img_identity():
    img = torch.rand(1, 3, 8, 8)
    assert scale_img(img) is img


# ---- copy_attr ----------------------------------------------------------------------------------------------

def test_copy_attr_include_exclude():
    b = SimpleNamespace(x=1, y=2, z=3, _private=4)
    a = SimpleNamespace()
    copy_attr(a, b)
    assert vars(a) == {'x': 1, 'y': 2, 'z': 3}
    a = SimpleNamespace()
    copy_attr(a, b, include=('x', 'y', '_private'), exclude=('y',))
    assert vars(a) == {'x': 1}


# ---- smart_optimizer ------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name, cls', [('Adam', torch.optim.Adam), ('AdamW', torch.optim.AdamW),
                                       ('RMSProp', torch.optim.RMSprop), ('SGD', torch.optim.SGD)])
def test_smart_optimizer_groups(log, name, cls):
    m = net()
    opt = smart_optimizer(m, name, lr=0.01, momentum=0.8, decay=5e-4)
    assert type(opt) is cls
    bias, decayed, norm = opt.param_groups
    ids = lambda g: {id(p) for p in g['params']}  # noqa: E731
    assert ids(bias) == {id(m[1].bias), id(m[3].bias), id(m[7].bias), id(m[8].bias)}
    assert ids(decayed) == {id(m[0].weight), id(m[3].weight), id(m[7].weight)}
    assert ids(norm) == {id(m[1].weight), id(m[8].weight)}  # BatchNorm and LayerNorm weights: no decay
    assert decayed['weight_decay'] == 5e-4 and norm['weight_decay'] == 0.0 and bias['weight_decay'] == 0.0
    assert all(g['lr'] == 0.01 for g in opt.param_groups)
    if name in ('Adam', 'AdamW'):
        assert bias['betas'] == (0.8, 0.999)
    else:
        assert bias['momentum'] == 0.8
    if name == 'SGD':
        assert bias['nesterov'] is True
    msg = log.records[-1].getMessage()
    assert f'{cls.__name__}(lr=0.01) with parameter groups 2 weight(decay=0.0), 3 weight(decay=0.0005), 4 bias' in msg


def test_smart_optimizer_unknown():
    with pytest.raises(NotImplementedError, match='Lion'):
        smart_optimizer(net(), 'Lion')


def test_smart_optimizer_non_affine_norm_steps():
    m = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2, affine=False))
    opt = smart_optimizer(m, 'SGD')
    assert [len(g['params']) for g in opt.param_groups] == [1, 1, 0]
    m(torch.rand(2, 1, 2, 2)).sum().backward()
    opt.step()


# ---- smart_resume ---------------------------------------------------------------------------------------------

def make_ckpt(epoch=4):
    model = net()
    opt = smart_optimizer(model, 'SGD', lr=0.1)
    model(torch.rand(2, 3, 8, 8)).sum().backward()
    opt.step()
    ema_model = net().half()
    with torch.no_grad():
        for p in ema_model.parameters():
            p.fill_(0.25)
    return {'epoch': epoch, 'optimizer': opt.state_dict(), 'best_fitness': 0.7, 'ema': ema_model, 'updates': 123}, model


def test_smart_resume_restores_optimizer_and_ema(log):
    ckpt, model = make_ckpt()
    opt = smart_optimizer(net(), 'SGD', lr=0.1)
    ema = SimpleNamespace(ema=net(), updates=0)
    out = smart_resume(ckpt, opt, ema, weights='last.pt', epochs=300)
    assert out == (0.7, 5, 300)
    assert ema.updates == 123
    assert all(torch.all(p == 0.25) and p.dtype == torch.float32 for p in ema.ema.parameters())
    assert len(opt.state_dict()['state']) == len(ckpt['optimizer']['state']) > 0  # momentum buffers loaded
    assert 'Resuming training from last.pt from epoch 5 to 300 total epochs' in log.text


def test_smart_resume_with_real_model_ema():
    ckpt, _ = make_ckpt()
    ema = torchutils_ext.ModelEMA(net())
    smart_resume(ckpt, smart_optimizer(net(), 'SGD'), ema)
    assert ema.updates == 123
    assert all(torch.all(v == 0.25) for v in ema.ema.parameters())


def test_smart_resume_finished_raises():
    ckpt, _ = make_ckpt(epoch=-1)
    with pytest.raises(ValueError, match='nothing to resume'):
        smart_resume(ckpt, smart_optimizer(net(), 'SGD'), weights='w.pt')


def test_smart_resume_finetune_and_no_optimizer(log):
    ckpt, _ = make_ckpt(epoch=9)
    ckpt['optimizer'] = None
    out = smart_resume(ckpt, smart_optimizer(net(), 'SGD'), None, epochs=3, resume=False)
    assert out == (0.0, 10, 12)  # best_fitness only restored with the optimizer; 3 more epochs after 9
    assert 'Fine-tuning for 3 more epochs' in log.text


# ---- EarlyStopping --------------------------------------------------------------------------------------------

def seed_early_stop(patience, fitness):
    best, best_epoch, p = 0.0, 0, patience or float('inf')
    out = []
    for epoch, f in enumerate(fitness):
        if f >= best:
            best_epoch, best = epoch, f
        out.append((epoch - best_epoch >= p, epoch - best_epoch >= p - 1))
    return out


@pytest.mark.parametrize('patience', [0, 1, 3, 30])
def test_early_stopping(patience, log):
    fitness = [0.0, 0.1, 0.3, 0.3, 0.2, 0.1, 0.25, 0.29, 0.1, 0.05, 0.0, 0.31]
    es = EarlyStopping(patience=patience)
    got = []
    for e, f in enumerate(fitness):
        got.append((es(e, f), es.possible_stop))
    assert got == seed_early_stop(patience, fitness)
    assert es.best_fitness == 0.31 and es.best_epoch == 11
    if patience == 3:
        assert 'Stopping training early' in log.text


def test_early_stopping_ties_count_as_improvement():
    es = EarlyStopping(patience=2)
    assert [es(e, 0.0) for e in range(5)] == [False] * 5


# ---- YOLOv5 extras ----------------------------------------------------------------------------------------------

def test_smart_inference_mode():
    @smart_inference_mode()
    def f(x):
        return x * 2

    y = f(torch.ones(2, requires_grad=True))
    assert torch.is_inference(y) and not y.requires_grad

    @smart_inference_mode(torch_1_9=False)
    def g(x):
        return x * 2

    y = g(torch.ones(2, requires_grad=True))
    assert not torch.is_inference(y) and not y.requires_grad


@pytest.mark.parametrize('amp', [False, True])
def test_smart_amp_autocast_quiet_on_cpu(amp):
    m = nn.Linear(4, 4)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        ctx = smart_amp_autocast(amp)
        with ctx:
            y = m(torch.rand(2, 4))
    if not torch.cuda.is_available():
        assert y.dtype == torch.float32
    assert hasattr(ctx, '__enter__')


def test_smart_cross_entropy():
    loss = smartCrossEntropyLoss(label_smoothing=0.1)
    assert isinstance(loss, nn.CrossEntropyLoss) and loss.label_smoothing == 0.1
    assert smartCrossEntropyLoss().label_smoothing == 0.0


@pytest.mark.parametrize('smoothing', [0.0, 0.1])
def test_smart_cross_entropy_before_torch_1_10(monkeypatch, caplog, smoothing):
    """The seed's fallback: no label smoothing before torch 1.10, and a warning when some was asked for."""
    import torchutils_ext.training as training
    monkeypatch.setattr(training, '_TORCH', '1.9.0')
    with caplog.at_level(logging.WARNING, logger='torchutils_ext'):
        loss = smartCrossEntropyLoss(label_smoothing=smoothing)
    assert isinstance(loss, nn.CrossEntropyLoss) and loss.label_smoothing == 0.0
    warned = [r for r in caplog.records if 'label smoothing 0.1 requires torch>=1.10.0' in r.getMessage()]
    assert len(warned) == (1 if smoothing else 0)


class Classify(nn.Module):  # the shape of YOLOv5's models.common.Classify head
    def __init__(self, c1, c2):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(c1, c2)


def test_reshape_linear_last():
    m = nn.Module()
    m.body, m.fc = nn.Conv2d(3, 8, 1), nn.Linear(8, 1000)
    reshape_classifier_output(m, 10)
    assert (m.fc.in_features, m.fc.out_features) == (8, 10)
    fc = m.fc
    reshape_classifier_output(m, 10)
    assert m.fc is fc  # unchanged when already n


def test_reshape_sequential_linear_and_conv():
    m = nn.Module()
    m.classifier = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Dropout(), nn.Linear(8, 1000))
    reshape_classifier_output(m, 3)
    assert m.classifier[0].out_features == 8 and m.classifier[3].out_features == 3  # the last Linear
    m = nn.Module()
    m.classifier = nn.Sequential(nn.Dropout(), nn.Conv2d(512, 1000, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
    reshape_classifier_output(m, 7)
    c = m.classifier[1]
    assert (c.in_channels, c.out_channels, c.kernel_size, c.bias is not None) == (512, 7, (1, 1), True)


def test_reshape_yolov5_classify_inside_model():
    m = nn.Module()
    m.model = nn.Sequential(nn.Conv2d(3, 8, 1), Classify(8, 1000))
    reshape_classifier_output(m, 5)
    assert m.model[1].linear.out_features == 5 and m.model[1].linear.in_features == 8
    m2 = nn.Module()
    m2.model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Linear(8, 1000))
    reshape_classifier_output(m2, 4)
    assert m2.model[1].out_features == 4  # replaced inside .model, where it lives


def test_smart_hub_load(monkeypatch):
    calls = []

    def fake_load(repo, model, **kw):
        calls.append((repo, model, kw))
        if len(calls) == 1:
            raise RuntimeError('cache corrupt')
        return 'MODEL'

    monkeypatch.setattr(torch.hub, 'load', fake_load)
    assert smart_hub_load(model='yolov5n', pretrained=True) == 'MODEL'
    (r0, m0, k0), (_, _, k1) = calls
    assert (r0, m0) == ('ultralytics/yolov5', 'yolov5n')
    assert k0 == {'pretrained': True, 'skip_validation': True, 'trust_repo': True}
    assert k1 == dict(k0, force_reload=True)
