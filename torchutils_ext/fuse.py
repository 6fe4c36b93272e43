"""Conv/Linear + BatchNorm folding: the seed's fuse_conv_and_bn, and fuse_model for a whole model in one call."""
from __future__ import annotations

import inspect

import torch
import torch.nn as nn

from ._fuse_rules import CONV as _CONV
from ._fuse_rules import buffer as _buffer
from ._fuse_rules import find_pairs, fuses_like_yolo
from ._fuse_rules import out_channels as _out_channels
from ._fuse_rules import param as _param
from ._ops import fold_conv_bn


def _transposed_groups(layer) -> int:
    return layer.groups if isinstance(layer, nn.modules.conv._ConvTransposeNd) else 0


def _check_pair(layer, bn):
    if not isinstance(layer, _CONV):
        raise TypeError(f'cannot fold BatchNorm into {type(layer).__name__}: expected a Conv, ConvTranspose or Linear')
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        raise TypeError(f'expected a BatchNorm layer, got {type(bn).__name__}')
    if _buffer(bn, 'running_mean') is None or _buffer(bn, 'running_var') is None:
        raise ValueError('BatchNorm without running statistics (track_running_stats=False) cannot be folded')
    if bn.num_features != _out_channels(layer):
        raise ValueError(f'BatchNorm has {bn.num_features} channels, the layer before it has {_out_channels(layer)}')


def _fold_args(pairs):
    # no .detach(): the op runs under no_grad, and a detach() per tensor is measurable host work
    cols = ([], [], [], [], [], [], [], [])
    for layer, bn in pairs:
        for col, v in zip(cols, (_param(layer, 'weight'), _param(layer, 'bias'), _param(bn, 'weight'),
                                 _param(bn, 'bias'), _buffer(bn, 'running_mean'), _buffer(bn, 'running_var'),
                                 bn.eps, _transposed_groups(layer))):
            col.append(v)
    return cols


def fuse_conv_and_bn(conv, bn):
    """Return a new layer equal to ``bn(conv(x))`` in eval mode, with bias and ``requires_grad=False``.

    Unlike the seed it keeps dilation, padding_mode, output_padding, dtype, device and memory format, accepts
    Conv1d/2d/3d, ConvTranspose (any groups) and Linear, and scales rows instead of building a C×C ``diag``.
    """
    _check_pair(conv, bn)
    (w,), (b,) = fold_conv_bn(*_fold_args([(conv, bn)]))
    fused = _new_layer_like(conv)
    fused.weight = nn.Parameter(w, requires_grad=False)
    fused.bias = nn.Parameter(b, requires_grad=False)
    fused.train(conv.training)
    return fused


_MODULE_KEYS = frozenset(nn.Module().__dict__)  # what every Module's __init__ puts in __dict__


def _new_layer_like(layer):
    """A new layer of the same class and hyperparameters, its parameters still to be set. The torch classes
    themselves skip __init__, whose reset_parameters, even on the meta device, runs Python decompositions:
    a large share of fuse_conv_and_bn per layer. Subclasses are built through __init__."""
    cls = type(layer)
    if cls in _CONV:
        return _copy_hyperparameters(layer)
    if isinstance(layer, nn.Linear):
        args, kw = (layer.in_features, layer.out_features), dict(bias=True, device='meta')
    else:
        args = (layer.in_channels, layer.out_channels)
        kw = dict(kernel_size=layer.kernel_size, stride=layer.stride, padding=layer.padding,
                  dilation=layer.dilation, groups=layer.groups, bias=True, padding_mode=layer.padding_mode,
                  device='meta')  # meta: no allocation
        if isinstance(layer, nn.modules.conv._ConvTransposeNd):
            kw['output_padding'] = layer.output_padding
    try:  # a subclass's __init__ may take fewer keywords (timm's Conv2dSame has no padding_mode, no device)
        params = inspect.signature(cls.__init__).parameters
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            kw = {k: v for k, v in kw.items() if k in params}
        new = cls(*args, **kw)
    except (TypeError, ValueError):  # it cannot be rebuilt from the hyperparameters: copy its attributes
        return _copy_hyperparameters(layer)
    for k in ('stride', 'padding', 'dilation', 'groups', 'padding_mode', 'output_padding'):
        if k in layer.__dict__:  # whatever its __init__ did with them, keep the layer's own
            new.__dict__[k] = layer.__dict__[k]
    return new


def _copy_hyperparameters(layer):
    """A layer of the same class with the same non-module attributes, built without __init__."""
    cls = type(layer)
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    for k, v in layer.__dict__.items():  # hyperparameters only: ints, tuples, str, a list
        if k not in _MODULE_KEYS:
            new.__dict__[k] = list(v) if isinstance(v, list) else v
    return new


def _plain_setattr(module) -> bool:
    """The class keeps Module.__setattr__, which stores a non-module, non-tensor value in __dict__ and nothing else."""
    return type(module).__setattr__ is nn.Module.__setattr__


def _set_bias(layer, b):
    """``layer.bias = Parameter(b)`` for a layer built with bias=False: a dict store where that is all
    __setattr__ would do, for less host work a layer."""
    p = nn.Parameter(b, requires_grad=_param(layer, 'weight').requires_grad)
    if (_plain_setattr(layer) and not nn.modules.module._global_parameter_registration_hooks
            and layer._parameters.get('bias', 0) is None):  # register_parameter's checks all pass here
        layer._parameters['bias'] = p
    else:
        layer.bias = p


def fuse_model(model, *, report=False):
    """Fold every Conv/ConvTranspose + BatchNorm pair of ``model`` whose wiring is proven, in place, with one batched
    call; returns ``model`` (``report=True``: ``(model, report)``).

    Which pairs, and why the others are left alone: ``_fuse_rules`` (the pair's own conditions, then its wiring:
    a YOLOv5/Ultralytics ``Conv`` block, a plain ``nn.Sequential``, or the traced graph of forward()). Blocks with
    ``.conv``/``.bn`` lose ``bn`` and switch ``forward`` to ``forward_fuse`` when they have one (the
    YOLOv5/Ultralytics convention; otherwise ``bn`` becomes ``nn.Identity``); any other folded BN becomes
    ``nn.Identity``. Folding uses the BN's running statistics: only BNs in eval mode are folded.

    ``report``: ``{'folded': [(layer name, bn name)], 'skipped': [(layer name or None, bn name or None, reason)]}``
    with the names of ``model.named_modules()`` before fusing; each BN appears once. Nothing is changed when the
    fold raises (a pair its checks refuse): the op validates every pair before it writes any.
    """
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError('fuse_model changes an nn.Module in place; a ScriptModule (torch.jit.script/trace) cannot '
                        'be changed that way: fuse the eager model first, then script it')
    found, summary = find_pairs(model)
    if found:
        _fold_pairs(found, [(layer, bn if how == 'block' else parent._modules[bn]) for parent, layer, bn, how in found])
    return (model, summary) if report else model


def _fold_pairs(found, pairs):
    """One batched in-place fold, then each BN leaves its parent (forward_fuse, or nn.Identity in its place)."""
    _, biases = fold_conv_bn(*_fold_args(pairs), inplace=True)
    for (parent, layer, bn, how), b in zip(found, biases):
        bias = _param(layer, 'bias')
        if bias is None:
            _set_bias(layer, b)
        else:
            with torch.no_grad():
                bias.copy_(b)
        if how == 'seq':
            parent._modules[bn] = nn.Identity()
        elif fuses_like_yolo(parent):
            delattr(parent, 'bn')
            if _plain_setattr(parent):
                parent.__dict__['forward'] = parent.forward_fuse  # all Module.__setattr__ does for a method
            else:
                parent.forward = parent.forward_fuse
        else:
            parent.bn = nn.Identity()
