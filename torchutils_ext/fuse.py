"""Conv/Linear + BatchNorm folding: the seed's fuse_conv_and_bn, and fuse_model for a whole model in one call."""
from __future__ import annotations

import inspect
import logging

import torch
import torch.nn as nn

from ._ops import fold_conv_bn
from ._walk import modules_once
from .fuse_graph import graph_pairs

_LOG = logging.getLogger('torchutils_ext')
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)
# Exact types only: subclasses (timm's BatchNormAct2d, ...) add behaviour that folding would drop.
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def _transposed_groups(layer) -> int:
    return layer.groups if isinstance(layer, nn.modules.conv._ConvTransposeNd) else 0


def _out_channels(layer) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def _check_pair(layer, bn):
    if not isinstance(layer, _CONV):
        raise TypeError(f'cannot fold BatchNorm into {type(layer).__name__}: expected a Conv, ConvTranspose or Linear')
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        raise TypeError(f'expected a BatchNorm layer, got {type(bn).__name__}')
    if _buffer(bn, 'running_mean') is None or _buffer(bn, 'running_var') is None:
        raise ValueError('BatchNorm without running statistics (track_running_stats=False) cannot be folded')
    if bn.num_features != _out_channels(layer):
        raise ValueError(f'BatchNorm has {bn.num_features} channels, the layer before it has {_out_channels(layer)}')


_MISSING = object()


def _param(module, name):
    """``getattr(module, name)`` for a parameter slot as one dict read: Module.__getattr__ runs only after a
    failed normal lookup, and fusing a large model reads hundreds of slots. Anything else (a parametrized weight
    is a property) goes through getattr."""
    v = module._parameters.get(name, _MISSING)
    return getattr(module, name) if v is _MISSING else v


def _buffer(module, name):
    """The same for a buffer slot (BatchNorm running statistics)."""
    v = module._buffers.get(name, _MISSING)
    return getattr(module, name) if v is _MISSING else v


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


def _foldable(layer, bn) -> bool:
    """A layer→BN pair fuse_model can fold in place: exact BN types with running statistics, and a layer whose
    weight and bias are plain parameter slots. A parametrized weight (weight_norm, ...) is computed on each
    access: folding into it would change nothing and leave the model wrong once the BN is dropped."""
    if not (isinstance(layer, _CONV) and type(bn) in _BN):
        return False
    p = layer._parameters
    return _buffer(bn, 'running_mean') is not None and p.get('weight') is not None and 'bias' in p


def _yolo_conv_forward(self, x):  # the forward of YOLOv5's and Ultralytics' Conv (and DWConv, a subclass)
    return self.act(self.bn(self.conv(x)))


def _conv_bn_forward(self, x):
    return self.bn(self.conv(x))


_KNOWN_FORWARDS = {(f.__code__.co_code, f.__code__.co_names) for f in (_yolo_conv_forward, _conv_bn_forward)}
_PLAIN_FORWARDS = {c.forward for c in _CONV} | {nn.Sequential.forward}


def _known_block(m) -> bool:
    """A block whose forward is exactly ``act(bn(conv(x)))`` or ``bn(conv(x))``: compared as bytecode, so a
    pre-activation block, ``bn(conv(x) + cv2(x))`` (Ultralytics' Conv2) or any other wiring of the same
    attributes does not match."""
    code = getattr(type(m).forward, '__code__', None)
    return code is not None and (code.co_code, code.co_names) in _KNOWN_FORWARDS


def _hooked(*modules) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules) or bool(
        nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks)


def _places(model):
    """{id(module): how many parents register it}."""
    places = {}
    for m in modules_once(model):
        for child in m._modules.values():
            if child is not None:
                places[id(child)] = places.get(id(child), 0) + 1
    return places


def _pair_problem(parent, layer, bn, places):
    """Why a layer→BN pair whose wiring is known must still be left alone, or None."""
    return (f'{type(layer).__name__} has its own forward()' if type(layer).forward not in _PLAIN_FORWARDS
            else 'a hook runs on it' if _hooked(parent, layer, bn)
            else 'the layer or the BatchNorm is registered at more than one place'
            if places.get(id(layer), 0) > 1 or places.get(id(bn), 0) > 1 else None)


def _graph_pairs(model, paired, places, skips):
    """Pairs from the traced graph, for the BNs the attribute rules left unpaired (``paired``: their ids)."""
    def layer_ok(parent, layer, bn):
        if not _foldable(layer, bn):
            return f'{type(layer).__name__} is not a foldable layer (a parametrized weight, or no bias slot)'
        return _pair_problem(parent, layer, bn, places)
    return [(parent, layer, attr, 'seq') for parent, layer, attr in graph_pairs(model, layer_ok, _BN, paired, skips)]


def _find_pairs(model, skips):
    """(parent, layer, bn, how) for the pairs whose wiring is known without tracing: YOLO blocks whose forward is
    ``act(bn(conv(x)))`` and layer→BN neighbours in a plain ``nn.Sequential``; the layer and the BN run torch's
    own forward, carry no hooks and are registered at one place only. Every other candidate is logged (debug)
    with the reason it is left alone: folding a pair that forward() does not wire that way corrupts the model.
    BNs still unpaired then are looked for in the traced graph (``fuse_graph``). ``skips`` receives
    (layer, bn, reason) for every candidate left alone."""
    places = _places(model)
    found, seen = [], set()

    def consider(parent, layer, bn, key, how, wiring_known):
        if not _foldable(layer, bn) or id(bn) in seen:
            return
        why = ('its forward() is not act(bn(conv(x))) or bn(conv(x))' if not wiring_known
               else _pair_problem(parent, layer, bn, places))
        if why:
            _LOG.debug('fuse_model: %s -> %s in %s left unfused: %s', type(layer).__name__, type(bn).__name__,
                       type(parent).__name__, why)
            skips.append((layer, bn, why))
            return
        seen.add(id(bn))
        found.append((parent, layer, key, how))

    left = False  # an exact-type BN with running statistics that no rule paired: worth a trace
    for m in modules_once(model):
        if type(m) in _BN and _buffer(m, 'running_mean') is not None and id(m) not in seen:
            left = True  # (seen grows as pairs are found: checked again below)
        kids = m._modules  # dict lookups: a getattr miss raises and catches an AttributeError
        conv, bn = kids.get('conv'), kids.get('bn')
        if conv is not None and bn is not None:
            consider(m, conv, bn, bn, 'block', _known_block(m))
        if isinstance(m, nn.Sequential):
            items = list(kids.items())
            for (_, a), (name, b) in zip(items, items[1:]):
                consider(m, a, b, name, 'seq', type(m).forward is nn.Sequential.forward)
    if left and any(type(m) in _BN and _buffer(m, 'running_mean') is not None and id(m) not in seen
                    for m in modules_once(model)):
        found += _graph_pairs(model, seen, places, skips)
    return found


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
    """Fold every Conv/Linear + BatchNorm pair of ``model`` in place with one batched call; returns ``model``
    (``report=True``: ``(model, report)``, see below).

    YOLO blocks with ``.conv``/``.bn`` lose ``bn`` and switch ``forward`` to ``forward_fuse`` when they have
    one (the YOLOv5/Ultralytics convention; otherwise ``bn`` becomes ``nn.Identity``); a BN that follows a layer
    in an ``nn.Sequential`` becomes ``nn.Identity``. When BNs are left over, the model is traced (torch.fx) and
    the layer→BN edges of its graph are folded too, their BNs becoming ``nn.Identity`` (ResNet's conv1/bn1).
    Folding uses the BN running statistics (eval semantics).

    ``report``: ``{'folded': [(layer name, bn name)], 'skipped': [(layer name or None, bn name or None, reason)]}``
    with the names of ``model.named_modules()`` before fusing; every candidate pair left alone is there with the
    reason (its wiring is unknown, a hook, a shared layer, a BN in training mode, an untraceable model, ...).
    """
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError('fuse_model changes an nn.Module in place; a ScriptModule (torch.jit.script/trace) cannot '
                        'be changed that way: fuse the eager model first, then script it')
    skips = []
    found = _find_pairs(model, skips)
    # (a layer followed by two BNs is registered at two places, or called twice in the graph: never found)
    pairs = [(layer, bn if how == 'block' else parent._modules[bn]) for parent, layer, bn, how in found]
    for layer, bn in pairs:
        _check_pair(layer, bn)
    summary = _report(model, pairs, skips) if report else None  # names before the BNs are replaced
    if pairs:
        _fold_pairs(found, pairs)
    return (model, summary) if report else model


def _report(model, pairs, skips):
    names = {}
    for name, m in model.named_modules(remove_duplicate=False):
        names.setdefault(id(m), name)
    name = lambda m: None if m is None else names.get(id(m))  # noqa: E731
    return {'folded': [(name(layer), name(bn)) for layer, bn in pairs],
            'skipped': [(name(layer), name(bn), why) for layer, bn, why in skips]}


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
        elif hasattr(parent, 'forward_fuse'):
            delattr(parent, 'bn')
            if _plain_setattr(parent):
                parent.__dict__['forward'] = parent.forward_fuse  # all Module.__setattr__ does for a method
            else:
                parent.forward = parent.forward_fuse
        else:
            parent.bn = nn.Identity()
