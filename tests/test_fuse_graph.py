"""fuse_model's graph rule (torch.fx): layer→BN edges wired in forward() are folded, the rest left with a reason."""
import copy
import io

import pytest
import torch
import torch.nn as nn
from client_packages import need

import torchutils_ext as tx


def _stats(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


def _n_bn(model):
    return sum(type(m) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d) for m in model.modules())


class ResBlock(nn.Module):  # torchvision's BasicBlock wiring: attribute names say nothing about the order
    def __init__(self, c=6):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))) + x)


class TransposedAndLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.bn_up = nn.ConvTranspose2d(4, 6, 2, stride=2, groups=2), nn.BatchNorm2d(6)
        self.fc, self.bn_fc = nn.Linear(6, 5), nn.BatchNorm1d(5)

    def forward(self, x):
        y = self.bn_up(self.up(x))
        return self.bn_fc(self.fc(y.mean((2, 3))))


@pytest.mark.parametrize('make,shape', [(ResBlock, (2, 6, 8, 8)), (TransposedAndLinear, (2, 4, 5, 5))])
def test_graph_pairs_are_folded_against_float64(backend, make, shape):
    torch.manual_seed(0)
    model = _stats(make())
    x = torch.randn(shape)
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(x.double())
        fused = tx.fuse_model(model)
        got = fused(x)
    # Linear->BN1d is left: a BN normalises dim 1, the Linear's output only for 2-d inputs (test_fuse_proof.py)
    assert fused is model and _n_bn(model) == (1 if make is TransposedAndLinear else 0)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('make,shape', [(ResBlock, (2, 6, 8, 8)), (TransposedAndLinear, (2, 4, 5, 5))])
def test_graph_fused_model_survives_save_and_load(backend, make, shape):
    torch.manual_seed(0)
    model = tx.fuse_model(_stats(make()))
    x = torch.randn(shape)
    buf = io.BytesIO()  # the whole module, pickled
    torch.save(model, buf)
    buf.seek(0)
    again = torch.load(buf, weights_only=False)
    torch.manual_seed(1)  # other weights and statistics, fused the same way, then given the saved state
    other = tx.fuse_model(_stats(make(), seed=1))
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    other.load_state_dict(torch.load(buf, weights_only=True))  # strict: the same keys (the bias folding added)
    with torch.no_grad():
        want = model(x)
        assert torch.equal(again(x), want) and torch.equal(other(x), want)
    assert _n_bn(again) == _n_bn(other) == (1 if make is TransposedAndLinear else 0)


class SharedConv(nn.Module):  # one conv, two call sites, a BN after only one of them
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv(x)


class TwoUsers(nn.Module):  # the conv output feeds the BN and a residual
    def __init__(self):
        super().__init__()
        self.c, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.c(x)
        return self.b(y) + y


class Untraceable(nn.Module):  # data-dependent control flow
    def __init__(self):
        super().__init__()
        self.c, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.c(x)
        return self.b(y) if y.sum() > 0 else self.b(-y)


class ShapeWiring(nn.Module):  # fx cannot trace it; torch.export can, but records one input size's wiring
    def __init__(self):
        super().__init__()
        self.c, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.c(x)
        return self.b(y + x if x.shape[-1] > 8 else y)  # the model benchmarks/README.md measures export on


@pytest.mark.parametrize('make,why', [(SharedConv, 'other users'), (TwoUsers, 'other users'),
                                      (Untraceable, 'cannot be traced'), (ShapeWiring, 'cannot be traced')])
def test_graph_rule_leaves_what_it_cannot_prove(backend, make, why, caplog):
    torch.manual_seed(0)
    model = _stats(make())
    xs = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 16, 16)  # ShapeWiring: both wirings
    with torch.no_grad():
        want = [model(x) for x in xs]
        with caplog.at_level('DEBUG', logger='torchutils_ext'):
            tx.fuse_model(model)
        assert _n_bn(model) == 1 and all(torch.equal(model(x), w) for x, w in zip(xs, want))
    assert why in caplog.text


def test_bn_in_training_mode_is_left(backend, caplog):
    model = _stats(ResBlock())
    model.bn1.train()
    with caplog.at_level('DEBUG', logger='torchutils_ext'):
        tx.fuse_model(model)
    assert isinstance(model.bn1, nn.BatchNorm2d) and isinstance(model.bn2, nn.Identity)
    assert 'training mode' in caplog.text


@pytest.mark.parametrize('name', ['resnet18', 'mobilenet_v3_small', 'regnet_y_400mf'])
def test_torchvision_models_fold_every_bn_fx_fuse_folds(backend, name):
    models = need('torchvision.models')
    from torch.fx.experimental.optimization import fuse as fx_fuse
    torch.manual_seed(0)
    model = _stats(getattr(models, name)(weights=None))
    x = torch.randn(1, 3, 64, 64)
    peer_left = _n_bn(fx_fuse(copy.deepcopy(model)))
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(x.double())
        tx.fuse_model(model)
        got = model(x)
    assert _n_bn(model) <= peer_left
    rel = ((got.double() - ref).abs().max() / ref.abs().max()).item()
    assert rel < 1e-5, rel


def test_report_names_what_was_folded_and_why_the_rest_was_not(backend):
    torch.manual_seed(0)
    model = _stats(nn.Sequential(ResBlock(4), TwoUsers(), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)))
    out, rep = tx.fuse_model(model, report=True)
    assert out is model
    assert sorted(rep['folded']) == [('0.conv1', '0.bn1'), ('0.conv2', '0.bn2'), ('2', '3')]
    assert rep['skipped'] == [('1.c', '1.b', 'the layer output has other users')]
    skipped = tx.fuse_model(_stats(Untraceable()), report=True)[1]['skipped']
    assert [s[:2] for s in skipped] == [(None, 'b'), (None, None)] and 'cannot be traced' in skipped[0][2]
    assert tx.fuse_model(nn.ReLU(), report=True)[1] == {'folded': [], 'skipped': []}
