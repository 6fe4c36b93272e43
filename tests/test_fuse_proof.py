"""fuse_model folds only what it proves equivalent for every input, and touches nothing else.

A zoo of models, each wired so that one fold would be wrong (or right), run through one property: after
fuse_model, every input the model accepts (several shapes, optional arguments given or not) gives the output it
gave before; every attribute, parameter and buffer of every module is what it was except the folded weights and
the replaced BatchNorms; the report lists each BN once, and what it calls folded is folded.
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import torchutils_ext as tx

BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def stats(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
    return model.eval()


# -- the zoo: (factory, inputs as (args, kwargs), {bn name: True (folded) or a reason substring})

class Head(nn.Module):  # forward builds a grid on its first call and keeps it
    def __init__(s):
        super().__init__()
        s.conv, s.bn, s.grid = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), None
        s.calls = []

    def forward(s, x):
        if s.grid is None:
            s.grid = torch.ones(1, 1, x.shape[2], x.shape[3])
        s.calls.append(1)
        return s.bn(s.conv(x)).relu() + s.grid


class OptionalMask(nn.Module):  # fx gives `mask` a proxy: `is None` picks a branch silently
    def __init__(s):
        super().__init__()
        s.c, s.b, s.c2 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(3, 4, 3, padding=1)

    def forward(s, x, mask=None):
        y = s.c(x)
        if mask is None:
            return s.b(y)
        return s.b(y * mask) + s.c2(x)


class DictOrTensor(nn.Module):
    def __init__(s):
        super().__init__()
        s.c, s.b = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

    def forward(s, x):
        if isinstance(x, dict):
            x = x['img'] * 2
            return s.b(s.c(x) + 1)
        return s.b(s.c(x))


class FunctionalWeight(nn.Module):  # the encoder's weight also decodes
    def __init__(s):
        super().__init__()
        s.enc = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6))

    def forward(s, x):
        return F.conv_transpose2d(s.enc(x), s.enc[0].weight, padding=1)


class ReadsBNStats(nn.Module):
    def __init__(s):
        super().__init__()
        s.seq = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))

    def forward(s, x):
        return s.seq(x) * s.seq[1].running_var.view(1, -1, 1, 1)


class Tapped(nn.Module):  # iterates its Sequential and keeps the pre-BN output
    def __init__(s):
        super().__init__()
        s.seq = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))

    def forward(s, x):
        outs = []
        for m in s.seq:
            x = m(x)
            outs.append(x)
        return outs[0] + outs[1]


class SharedWeight(nn.Module):
    def __init__(s):
        super().__init__()
        s.seq = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
        s.other = nn.Conv2d(4, 4, 1)
        s.other.weight = s.seq[0].weight

    def forward(s, x):
        return s.seq(x) + s.other(x)


class WSConv(nn.Conv2d):  # weight standardisation: only _conv_forward is overridden
    def _conv_forward(self, x, w, b):
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return super()._conv_forward(x, w, b)


class ReachesIntoBlock(nn.Module):  # a YOLO-style block, and a parent that calls its conv directly
    def __init__(s):
        super().__init__()
        s.blk = YoloConv(3, 4)
        s.seq = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))  # makes the model worth tracing

    def forward(s, x):
        return s.blk(s.seq(x)) + s.blk.conv(s.seq(x))


class YoloConv(nn.Module):
    def __init__(s, c1, c2):
        super().__init__()
        s.conv, s.bn, s.act = nn.Conv2d(c1, c2, 3, padding=1, bias=False), nn.BatchNorm2d(c2), nn.SiLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))

    def forward_fuse(self, x):
        return self.act(self.conv(x))


class Scripted(nn.Module):
    def __init__(s):
        super().__init__()
        s.inner = torch.jit.script(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).eval())
        s.seq = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))

    def forward(s, x):
        return s.seq(s.inner(x))


class LinearBN3d(nn.Module):
    def __init__(s):
        super().__init__()
        s.seq = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8))

    def forward(s, x):
        return s.seq(x)


class LinearChannels(nn.Module):  # (N, 6, 4) -> Linear on the last dim, BN over the 6 channels: a valid model
    def __init__(s):
        super().__init__()
        s.fc, s.bn = nn.Linear(4, 5), nn.BatchNorm1d(6)

    def forward(s, x):
        return s.bn(s.fc(x))


class LinearBN2d(nn.Module):
    def __init__(s):
        super().__init__()
        s.seq = nn.Sequential(nn.Linear(5, 3), nn.BatchNorm2d(3))

    def forward(s, x):
        return s.seq(x)


def _x(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))


ZOO = {
    'lazy grid': (Head, [((_x(1, 3, 5, 5),), {})], {'bn': 'writes'}),
    'optional mask': (OptionalMask, [((_x(1, 3, 5, 5),), {}), ((_x(1, 3, 5, 5), _x(1, 4, 5, 5)), {})],
                      {'b': 'identity'}),
    'dict or tensor': (DictOrTensor, [((_x(1, 3, 4, 4),), {}), (({'img': _x(1, 3, 4, 4)},), {})],
                       {'b': 'isinstance'}),
    'weight used functionally': (FunctionalWeight, [((_x(1, 3, 5, 5),), {})], {'enc.1': 'reads the tensors'}),
    'BN statistics read elsewhere': (ReadsBNStats, [((_x(1, 3, 4, 4),), {})], {'seq.1': 'reads the tensors'}),
    'tapped Sequential': (Tapped, [((_x(1, 3, 4, 4),), {})], {'seq.1': 'other users'}),
    'shared weight': (SharedWeight, [((_x(1, 4, 3, 3),), {})], {'seq.1': 'shared'}),
    'weight standardisation': (lambda: nn.Sequential(WSConv(3, 4, 3), nn.BatchNorm2d(4)),
                               [((_x(1, 3, 6, 6),), {})], {'1': 'overrides _conv_forward'}),
    'parent reaches into a block': (ReachesIntoBlock, [((_x(1, 3, 5, 5),), {})],
                                    {'blk.bn': 'reaches into the block', 'seq.1': True}),
    'scripted submodule': (Scripted, [((_x(1, 3, 4, 4),), {})], {'seq.1': True}),
    'Linear->BN1d, 3-d input': (LinearBN3d, [((_x(2, 8, 4),), {}), ((_x(3, 4),), {})], {'seq.1': 'rank'}),
    'Linear->BN1d over other channels': (LinearChannels, [((_x(2, 6, 4),), {})], {'bn': 'rank'}),
    'Linear->BN2d': (LinearBN2d, [((_x(2, 3, 4, 5),), {})], {'seq.1': 'rank'}),
    'YOLO block': (lambda: nn.Sequential(YoloConv(3, 4), YoloConv(4, 4)), [((_x(1, 3, 6, 6),), {})],
                   {'0.bn': True, '1.bn': True}),
    'conv then BN in forward': (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()),
                                [((_x(1, 3, 6, 6),), {}), ((_x(2, 3, 9, 7),), {})], {'1': True}),
}


def _attrs(model):
    """Every module's attributes as (module name, key) -> the object (identity is compared)."""
    out = {}
    for name, m in model.named_modules():
        for k, v in m.__dict__.items():
            if k in ('_parameters', '_buffers', '_modules'):
                for kk, vv in v.items():
                    out[(name, k, kk)] = vv
            elif isinstance(v, list):
                out[(name, k, 'len')] = len(v)
                out[(name, k)] = v
            else:
                out[(name, k)] = v
    return out


def _outputs(model, inputs):
    with torch.no_grad():
        return [model(*copy.deepcopy(a), **copy.deepcopy(kw)) for a, kw in inputs]


@pytest.mark.parametrize('case', list(ZOO), ids=list(ZOO))
def test_fuse_model_changes_no_output_and_no_other_state(backend, case):
    make, inputs, want = ZOO[case]
    torch.manual_seed(0)
    model = stats(make())
    if case == 'lazy grid':
        model(*inputs[0][0])  # the grid exists before fusing, as after a first call
    bns = {name: m for name, m in model.named_modules() if isinstance(m, BN_TYPES)}
    refs = _outputs(model, inputs)
    before = _attrs(model)  # after the calls: forward() may keep state of its own
    out, report = tx.fuse_model(model, report=True)
    assert out is model
    after = _attrs(model)
    got = _outputs(model, inputs)
    for r, g in zip(refs, got):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)
    # the report: each BN once; folded ones are gone, skipped ones are where they were
    named = [bn for _, bn, _ in report['skipped'] if bn is not None] + [bn for _, bn in report['folded']]
    assert len(named) == len(set(named))
    now = dict(model.named_modules())
    for _, bn in report['folded']:
        assert not isinstance(now.get(bn), BN_TYPES)
    for _, bn, _ in report['skipped']:
        if bn in bns:
            assert now.get(bn) is bns[bn]
    reasons = {bn: why for _, bn, why in report['skipped']}
    for bn, verdict in want.items():
        if verdict is True:
            assert (bn in [b for _, b in report['folded']]), (bn, report)
        else:
            assert verdict in reasons.get(bn, ''), (bn, reasons)
    # nothing else changed: every attribute is the object it was, but the folded pairs' own slots
    folded_layers = {layer for layer, _ in report['folded']}
    for key, value in before.items():
        name = key[0]
        if name in folded_layers or any(name == bn for _, bn in report['folded']):
            continue
        if key[1] == '_modules' and (f'{name}.{key[2]}' if name else key[2]) in {b for _, b in report['folded']}:
            continue  # the BN replaced in its parent
        if key[1:] in (('forward',), ('bn',)):
            continue
        assert after.get(key) is value or after.get(key) == value, key


def test_tracing_leaves_a_lazy_grid_unbuilt():
    """The issue's example: a model whose first call builds state must not find a proxy there after fusing."""
    model = stats(Head())
    tx.fuse_model(model)
    assert model.grid is None and model.calls == []
    y = model(torch.randn(1, 3, 4, 4))
    assert isinstance(model.grid, torch.Tensor) and isinstance(y, torch.Tensor)


@pytest.mark.parametrize('where', ['block', 'sequential', 'graph'])
def test_one_rule_for_a_bn_in_training_mode(backend, where):
    """Every rule leaves a BN in training mode (its output uses batch statistics) with the same reason."""
    class Graph(nn.Module):
        def __init__(s):
            super().__init__()
            s.c, s.b = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

        def forward(s, x):
            return s.b(s.c(x))
    model = stats({'block': lambda: nn.Sequential(YoloConv(3, 4)), 'sequential': lambda: nn.Sequential(
        nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)), 'graph': Graph}[where]())
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    bn.train()
    _, report = tx.fuse_model(model, report=True)
    assert report['folded'] == [] and any('training mode' in why for _, _, why in report['skipped'])
    assert any(m is bn for m in model.modules())


def test_sync_batchnorm_in_eval_mode_is_folded(backend):
    model = stats(nn.Sequential(nn.Conv2d(3, 4, 3), nn.SyncBatchNorm(4)))
    x = torch.randn(1, 3, 6, 6)
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(x.double())
        _, report = tx.fuse_model(model, report=True)
        got = model(x)
    assert report['folded'] == [('0', '1')] and isinstance(model[1], nn.Identity)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


def test_a_forward_hook_on_the_bn_leaves_the_pair(backend):
    model = stats(nn.Sequential(YoloConv(3, 4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)))
    model[0].bn.register_forward_hook(lambda m, i, o: o * 2)
    model[2].register_forward_pre_hook(lambda m, i: (i[0] + 1,))
    x = torch.randn(1, 3, 5, 5)
    with torch.no_grad():
        ref = model(x)
        _, report = tx.fuse_model(model, report=True)
        torch.testing.assert_close(model(x), ref)
    assert report['folded'] == [] and {bn for _, bn, _ in report['skipped']} == {'0.bn', '2'}


def test_one_bad_pair_raises_and_leaves_every_layer_untouched(backend):
    """The fold validates every pair before writing any: one pair it refuses (a BN whose statistics were
    replaced by the wrong length) raises, and no layer of the model is changed."""
    model = stats(nn.Sequential(YoloConv(3, 4), YoloConv(4, 4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)))
    model[1].bn.running_var = torch.ones(3)  # 3 statistics for 4 channels
    state = copy.deepcopy(model.state_dict())
    kids = [copy.copy(m._modules) for m in model.modules()]
    with pytest.raises((ValueError, RuntimeError)):
        tx.fuse_model(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert [m._modules for m in model.modules()] == kids


def test_report_names_rule_skips_on_a_model_fx_cannot_trace(backend):
    class Untraceable(nn.Module):
        def __init__(s):
            super().__init__()
            s.blocks = nn.Sequential(YoloConv(3, 4), YoloConv(4, 4))
            s.blocks[1].bn.register_forward_hook(lambda m, i, o: o)
            s.c, s.b = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

        def forward(s, x):
            y = s.c(s.blocks(x))
            return s.b(y) if y.sum() > 0 else s.b(-y)
    _, report = tx.fuse_model(stats(Untraceable()), report=True)
    reasons = {bn: why for _, bn, why in report['skipped']}
    assert report['folded'] == [('blocks.0.conv', 'blocks.0.bn')]
    assert 'hook' in reasons['blocks.1.bn'] and 'cannot be traced' in reasons['b']
    assert any(layer is None and bn is None and 'cannot be traced' in why for layer, bn, why in report['skipped'])


def test_a_forward_fuse_that_is_not_act_conv_is_not_switched_to(backend):
    class Odd(YoloConv):
        def forward_fuse(self, x):  # not what the fold computes
            return self.conv(x) * 2

    model = stats(nn.Sequential(Odd(3, 4), YoloConv(4, 4)))
    x = torch.randn(1, 3, 5, 5)
    with torch.no_grad():
        ref = model(x)
        tx.fuse_model(model)
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)
    assert isinstance(model[0].bn, nn.Identity) and 'forward' not in model[0].__dict__
    assert not hasattr(model[1], 'bn') and model[1].forward == model[1].forward_fuse
