"""``BaseModel.fuse`` of Ultralytics 8.4 with the plain Conv/ConvTranspose + BN pairs folded in one batched call.

The walk is theirs, step for step: the same modules in the same order (``self.model.modules()``, mutated as it
goes), the same structural changes at the same moment (``Conv2.fuse_convs``, BN removed, ``forward_fuse``), and
their own code for every block it does not fold itself (RepConv, RepVGGDW, Detect heads, a quantized model).
Only the arithmetic of the plain pairs is deferred and done together, in place, by ``_ops.fold_conv_bn``; a pair
the batched op should not take (a BN without running statistics, a parametrized or shared weight, ...) goes
through their ``fuse_conv_and_bn`` / ``fuse_deconv_and_bn`` as before. Deferring is exact because a pair's fold
reads only that pair; should a delegated block contain a pending layer, the pending folds run first.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from . import _ops
from ._walk import modules_once

# The names BaseModel.fuse of 8.4.x refers to: another set means their fuse changed and this mirror is stale.
FUSE_NAMES = frozenset((
    'Conv', 'Conv2', 'ConvTranspose', 'DWConv', 'Detect', 'RepConv', 'RepVGGDW', 'bn', 'conv', 'conv_transpose',
    'delattr', 'forward', 'forward_fuse', 'fuse', 'fuse_conv_and_bn', 'fuse_convs', 'fuse_deconv_and_bn', 'hasattr',
    'info', 'is_fused', 'is_qat', 'isinstance', 'model', 'modules'))
STOCK = None  # their BaseModel.fuse, set when the integration is applied (quantized models go there)
_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def check(tasks, saved):
    """What differs from the 8.4 fuse this module mirrors (empty: nothing)."""
    stock = saved or tasks.BaseModel.__dict__.get('fuse')
    if stock is None:
        return ['ultralytics.nn.tasks.BaseModel has no fuse']
    names = frozenset(stock.__code__.co_names)
    if names != FUSE_NAMES:
        return [f'BaseModel.fuse changed (names added: {sorted(names - FUSE_NAMES)}, gone: '
                f'{sorted(FUSE_NAMES - names)})']
    return [f'ultralytics.nn.tasks has no {n}' for n in sorted(FUSE_NAMES) if n[0].isupper() and not hasattr(tasks, n)]


class _Batch:
    """Plain layer + BN pairs waiting for one in-place fold."""

    def __init__(self, model):
        self.layers, self.bns, self.model = [], [], model
        self._places = self._params = None  # {id: registrations}, counted on first use

    def _shared(self, layer) -> bool:
        """The layer is registered at two places or its weight in two layers: their fold leaves the weight as it is
        for the others (it makes a new one), an in-place fold would not."""
        if self._places is None:
            self._places, self._params = {}, {}
            for m in modules_once(self.model):
                for child in m._modules.values():
                    if child is not None:
                        self._places[id(child)] = self._places.get(id(child), 0) + 1
                for p in m._parameters.values():
                    if p is not None:
                        self._params[id(p)] = self._params.get(id(p), 0) + 1
        return self._places.get(id(layer), 0) > 1 or self._params.get(id(layer._parameters['weight']), 0) > 1

    def _plain(self, layer, bn) -> bool:
        w = layer._parameters.get('weight')
        if not (isinstance(layer, _LAYERS) and isinstance(w, torch.Tensor) and 'bias' in layer._parameters
                and isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.num_features == layer.out_channels):
            return False
        stats = bn._buffers.get('running_mean'), bn._buffers.get('running_var')
        return (all(s is not None and s.dtype == w.dtype and s.device == w.device for s in stats)
                and not self._shared(layer))

    def take(self, block, attr, their_fold):
        """``block.<attr>`` + ``block.bn``: queued, or folded by ``their_fold``; then the block drops its BN and
        runs ``forward_fuse``, as theirs."""
        layer, bn = getattr(block, attr), block.bn
        if self._plain(layer, bn):  # (a layer in two blocks is shared, so never queued twice)
            self.layers.append(layer)
            self.bns.append(bn)
        else:
            setattr(block, attr, their_fold(layer, bn))
        delattr(block, 'bn')
        block.forward = block.forward_fuse

    def before(self, block):
        """About to run their code on ``block``: fold first any pending layer inside it."""
        if self.layers:
            pending = {id(x) for x in self.layers}
            if any(id(m) in pending for m in block.modules()):
                self.fold()

    def fold(self):
        if not self.layers:
            return
        layers, bns = self.layers, self.bns
        self.layers, self.bns = [], []
        args = ([x.weight for x in layers], [x.bias for x in layers], [b.weight for b in bns], [b.bias for b in bns],
                [b.running_mean for b in bns], [b.running_var for b in bns], [b.eps for b in bns],
                [x.groups if isinstance(x, nn.modules.conv._ConvTransposeNd) else 0 for x in layers])
        # weights loaded under inference mode are inference tensors: write them there, as loading made them
        infer = not torch.is_inference_mode_enabled() and any(w.is_inference() for w in args[0])
        with torch.inference_mode() if infer else torch.no_grad():
            _, biases = _ops.fold_conv_bn(*args, inplace=True)
        plain = not nn.modules.module._global_parameter_registration_hooks
        for layer, b in zip(layers, biases):
            bias = nn.Parameter(b, requires_grad=False)  # theirs makes a new bias too
            if plain and type(layer) in _LAYERS and type(layer).__setattr__ is nn.Module.__setattr__:
                layer._parameters['bias'] = bias  # all that register_parameter does here, for less host work
                layer._parameters['weight'].requires_grad_(False)  # = layer.requires_grad_(False): its only two
            else:
                layer.bias = bias
                layer.requires_grad_(False)


def fuse(self, verbose=True, imgsz=640):
    """Fuse Conv/ConvTranspose and BatchNorm layers, and reparameterize RepConv/RepVGGDW (Ultralytics'
    ``BaseModel.fuse``, same pairs and result; the plain pairs folded together by torchutils_ext)."""
    from ultralytics.nn import tasks as t  # the names their fuse resolves
    if t.is_qat(self):  # their fold also rescales the quantizers' weight ranges
        return STOCK(self, verbose=verbose, imgsz=imgsz)
    if not self.is_fused():
        batch = _Batch(self)
        for m in self.model.modules():
            if isinstance(m, (t.Conv, t.Conv2, t.DWConv)) and hasattr(m, 'bn'):
                if isinstance(m, t.Conv2):
                    m.fuse_convs()
                batch.take(m, 'conv', t.fuse_conv_and_bn)
            if isinstance(m, t.ConvTranspose) and hasattr(m, 'bn'):
                batch.take(m, 'conv_transpose', t.fuse_deconv_and_bn)
            if isinstance(m, t.RepConv):
                batch.before(m)
                m.fuse_convs()
                m.forward = m.forward_fuse
            if isinstance(m, t.RepVGGDW):
                batch.before(m)
                m.fuse()
                m.forward = m.forward_fuse
            if isinstance(m, t.Detect):
                batch.before(m)
                m.fuse()
        batch.fold()
        self.info(verbose=verbose, imgsz=imgsz)
    return self
