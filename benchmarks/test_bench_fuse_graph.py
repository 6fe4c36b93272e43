"""fuse_model on real CNNs wired in forward() (torchvision, timm, Ultralytics, and a ConvTranspose(groups=2)/Linear
model): ours against torch.fx.experimental.optimization.fuse and a per-layer torch fuse_conv_bn_eval loop over
the same pairs. Each timed call fuses a fresh copy (copied untimed), tracing included for fx.fuse and ours.
Checked: the BNs left (ours may leave no more than fx.fuse) and the fused output against the unfused model in
float64 (1e-5 of its largest value). Our rows' notes give the speed-up over fx.fuse, tracing included for both.
Rows run for the packages that import (CI phase b has them all); none are required here.
"""
import contextlib
import importlib
from copy import deepcopy

import pytest
import torch
import torch.nn as nn
from torch.fx.experimental.optimization import fuse as fx_fuse
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

import bench_ours as ours
import harness
from bench_checks import flatten_outputs, rel_err

OUT_TOL = 1e-5
BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
FX = 'torch.fx fuse (per layer, tracing included)'


class ConvTLinear(nn.Module):
    """The pairs fx.fuse cannot fold: ConvTranspose(groups=2)->BN and Linear->BN1d."""

    def __init__(self):
        super().__init__()
        self.up, self.bn_up = nn.ConvTranspose2d(3, 8, 2, stride=2, groups=1), nn.BatchNorm2d(8)
        self.g, self.bn_g = nn.ConvTranspose2d(8, 8, 3, padding=1, groups=2), nn.BatchNorm2d(8)
        self.fc, self.bn_fc = nn.Linear(8, 10), nn.BatchNorm1d(10)

    def forward(self, x):
        y = self.bn_g(self.g(torch.relu(self.bn_up(self.up(x)))))
        return self.bn_fc(self.fc(y.mean((2, 3))))


def _model(kind, name):
    torch.manual_seed(0)
    if kind == 'torchvision':
        m = getattr(importlib.import_module('torchvision.models'), name)(weights=None)
    elif kind == 'timm':
        m = importlib.import_module('timm').create_model(name, pretrained=False)
    elif kind == 'ultralytics':
        m = importlib.import_module('ultralytics.nn.tasks').DetectionModel(name, verbose=False)
    else:
        m = ConvTLinear()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for b in m.modules():
            if isinstance(b, nn.modules.batchnorm._BatchNorm) and b.running_mean is not None:
                b.running_mean.copy_(torch.randn(b.num_features, generator=g) * 0.1)
                b.running_var.copy_(torch.rand(b.num_features, generator=g) + 0.5)
    return m.eval()


MODELS = [('torchvision', 'resnet50'), ('torchvision', 'mobilenet_v3_large'), ('torchvision', 'efficientnet_b0'),
          ('torchvision', 'regnet_y_400mf'), ('timm', 'resnet50'), ('timm', 'efficientnet_b0'),
          ('ultralytics', 'yolov8n.yaml'), ('ours', 'convT+linear')]


def _per_layer(pairs_of):
    """torch's own per-layer folds over the pairs fuse_model reports, each swapped in by name."""
    def run(m):
        for layer_name, bn_name in pairs_of:
            layer, bn = m.get_submodule(layer_name), m.get_submodule(bn_name)
            if isinstance(layer, nn.Linear):
                fused = fuse_linear_bn_eval(layer, bn)
            else:
                fused = fuse_conv_bn_eval(layer, bn, transpose=isinstance(layer, nn.modules.conv._ConvTransposeNd))
            parent, _, attr = layer_name.rpartition('.')
            setattr(m.get_submodule(parent) if parent else m, attr, fused)
            bparent, _, battr = bn_name.rpartition('.')
            setattr(m.get_submodule(bparent) if bparent else m, battr, nn.Identity())
        return m
    return run


@pytest.mark.parametrize('kind,name', MODELS, ids=[n for _, n in MODELS])
def test_fuse_graph(kind, name, cfg, report):
    if kind != 'ours':
        try:
            importlib.import_module({'torchvision': 'torchvision', 'timm': 'timm', 'ultralytics': 'ultralytics'}[kind])
        except Exception as e:
            pytest.skip(f'{kind} not importable: {type(e).__name__}')
    base = _model(kind, name)
    name = f'{kind}:{name}' if kind != 'ours' else name
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = flatten_outputs(deepcopy(base).double()(x.double()))
    folded = ours.tx.fuse_model(deepcopy(base), report=True)[1]['folded']
    rows = [(FX, 'peer', 'torch', fx_fuse)]
    if folded:  # torch's per-layer folds over the same pairs (with none, a do-nothing row)
        rows.append(('torch fuse_conv_bn_eval per layer, our pairs (no search)', 'peer', 'torch', _per_layer(folded)))
    for label, backend, why in ours.backends('fold_conv_bn', cfg.device):
        if backend:
            rows.append((f'ours fuse_model, one call ({label})', 'ours', backend, ours.tx.fuse_model))
    calls, holders, failures = {}, {}, []
    for impl, role, backend, fn in rows:
        try:  # one untimed run: fx.fuse cannot trace every model (Ultralytics' detection head)
            with ours.using(backend) if role == 'ours' else contextlib.nullcontext():
                fn(deepcopy(base))
        except Exception as e:
            report.add('fuse-graph', name, impl, role, check='unsupported',
                       note=f'{type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ""}')
            if role == 'ours':
                failures.append(f'{impl}: {type(e).__name__}: {e}')
            continue
        holder = {}
        holders[impl] = (role, backend, holder)

        def fresh(holder=holder):
            holder['in'] = deepcopy(base)

        def call(fn=fn, holder=holder):
            holder['out'] = fn(holder['in'])
        calls[impl] = (ours.setup(role, backend, fresh), call)
    with ours.restoring_backend():
        timings = harness.time_interleaved(calls, cfg.device, max(3, cfg.repeats // 4), 1)
    left = {}
    for impl, (role, backend, holder) in holders.items():
        m = holder['out']
        left[impl] = sum(type(b) in BN for b in m.modules())
        with torch.no_grad(), ours.using(backend) if role == 'ours' else contextlib.nullcontext():
            err = max(rel_err(a, b) for a, b in zip(flatten_outputs(m(x)), ref))
        check = 'ok' if err <= OUT_TOL else f'wrong: output {err:.2g} off' if role == 'peer' else f'FAIL output {err:.2g}'
        if err > OUT_TOL and role == 'ours':  # a peer's wrong answer is reported (grouped ConvTranspose), not ours
            failures.append(f'{impl}: {check}')
        note = f'{left[impl]} BN left of {sum(type(b) in BN for b in base.modules())}'
        fx_ms = timings.get(FX, {}).get('median_ms')
        if role == 'ours' and fx_ms:
            note += f'; {fx_ms / timings[impl]["median_ms"]:.1f}x fx.fuse'
        report.add('fuse-graph', name, impl, role, timings[impl], None, None, check, note=note)
    fx_left = left.get(FX)
    for impl, n in left.items():
        if impl.startswith('ours') and fx_left is not None and n > fx_left:
            failures.append(f'{impl}: {n} BNs left where fx.fuse leaves {fx_left}')
    assert not failures, failures
