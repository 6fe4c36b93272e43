"""Which layer→BatchNorm pairs of a model fuse_model folds, and why it leaves each other one alone.

Folding replaces the BN by nothing and rescales the layer, so it is right only when, for every input, the BN's
input is the layer's output and nothing else reads the layer's output. Two conditions, each with its own checks:

1. The pair itself (``pair_problem``, applied alike whatever found the pair): an exact torch BN type in eval mode
   with running statistics, whose channels are the layer's output channels and whose rank is the layer's
   (Conv{1,2,3}d with BatchNorm{1,2,3}d; a Linear's output channel is dim 1 only for 2-d inputs, which nothing but
   running the model can tell, so Linear→BN pairs are left alone); a layer of a torch conv/linear class whose
   computation a subclass does not override, with a plain weight and a bias slot; no hooks; each module and each
   of their tensors registered at one place in the model.
2. The wiring, proven by one of three rules:
   - block: a module with ``conv`` and ``bn`` children whose forward is exactly ``act(bn(conv(x)))`` or
     ``bn(conv(x))`` (YOLOv5's and Ultralytics' Conv, compared as bytecode). Like the seed's fuse, this trusts
     that no code outside the block reaches into it; a traced model is also checked for that.
   - Sequential: neighbours in a plain ``nn.Sequential``, confirmed by the traced graph (a parent that iterates
     the Sequential and taps the layer's output is seen there). A model fx cannot trace keeps them on the
     strength of Sequential.forward alone, with a debug line saying so.
   - graph: any other layer→BN edge of the traced graph (``fuse_graph.Traced``), which must be a proof for every
     input (``_trace_safety``).
Scripted submodules are left as they are. Every candidate gets one verdict (``Verdicts``): folded, or left with
the first reason that applies.
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn

from .fuse_graph import Traced

_LOG = logging.getLogger('torchutils_ext')
CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)
# Exact types only: subclasses (timm's BatchNormAct2d, ...) add behaviour that folding would drop.
BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_RANK = {nn.Conv1d: 1, nn.ConvTranspose1d: 1, nn.Conv2d: 2, nn.ConvTranspose2d: 2, nn.Conv3d: 3,
         nn.ConvTranspose3d: 3, nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}
# What a conv/linear subclass may override and still compute what its torch base computes.
_HARMLESS = {'__init__', 'extra_repr', '__repr__', 'reset_parameters', '__setstate__', '_get_name', '__module__',
             '__qualname__', '__doc__', '__dict__', '__weakref__', '__annotations__', '__constants__',
             '__firstlineno__', '__static_attributes__', '__slotnames__', '_version'}
_MISSING = object()


def param(module, name):
    """``getattr(module, name)`` for a parameter slot as one dict read (Module.__getattr__ runs only after a failed
    normal lookup, and fusing a large model reads hundreds of slots); a parametrized weight (a property) goes
    through getattr."""
    v = module._parameters.get(name, _MISSING)
    return getattr(module, name) if v is _MISSING else v


def buffer(module, name):
    v = module._buffers.get(name, _MISSING)
    return getattr(module, name) if v is _MISSING else v


def out_channels(layer) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def _base(layer):
    return next(c for c in type(layer).__mro__ if c in CONV)


def _overrides(layer):
    """Names the layer's class defines over its torch base that could change what it computes."""
    base, names = _base(layer), set()
    for cls in type(layer).__mro__:
        if cls is base:
            break
        names |= set(vars(cls)) - _HARMLESS
    return sorted(n for n in names if hasattr(base, n) or n in ('forward', '_conv_forward'))


def _yolo_conv_forward(self, x):  # the forward of YOLOv5's and Ultralytics' Conv (and DWConv, a subclass)
    return self.act(self.bn(self.conv(x)))


def _conv_bn_forward(self, x):
    return self.bn(self.conv(x))


def _yolo_conv_forward_fuse(self, x):
    return self.act(self.conv(x))


def _conv_forward_fuse(self, x):
    return self.conv(x)


def _code(f):
    code = getattr(f, '__code__', None)
    return None if code is None else (code.co_code, code.co_names)


# each known forward, and the forward_fuse that computes it with the BN folded away
_KNOWN = {_code(_yolo_conv_forward): _code(_yolo_conv_forward_fuse), _code(_conv_bn_forward): _code(_conv_forward_fuse)}


def fuses_like_yolo(block) -> bool:
    """The block has the ``forward_fuse`` of its forward with the BN dropped (YOLOv5's/Ultralytics' ``act(conv(x))``):
    folded, it switches to it and loses ``bn`` (their convention); any other block keeps its forward, with ``bn``
    made an nn.Identity."""
    fused = _code(getattr(type(block), 'forward_fuse', None))
    return fused is not None and _KNOWN.get(_code(type(block).forward)) == fused


def known_block(m) -> bool:
    """A block whose forward is exactly ``act(bn(conv(x)))`` or ``bn(conv(x))``: compared as bytecode, so a
    pre-activation block, ``bn(conv(x) + cv2(x))`` (Ultralytics' Conv2) or any other wiring does not match."""
    return _code(type(m).forward) in _KNOWN


def _hooked(*modules) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules) or bool(
        nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks)


class ModelIndex:
    """One walk of the model: its modules (scripted subtrees not entered), names, and how many places register
    each module and each tensor."""

    def __init__(self, model: nn.Module):
        self.modules, self.names, self.by_name, self.scripted = [], {}, {}, []
        self.places, self.tensor_places = {}, {}
        stack = [('', model)]
        seen = set()
        while stack:
            name, m = stack.pop()
            if id(m) in seen:
                continue
            seen.add(id(m))
            self.modules.append(m)
            self.names[id(m)] = name
            self.by_name[name] = m
            if isinstance(m, torch.jit.ScriptModule) and m is not model:
                self.scripted.append(name)
                continue
            for box in (m._parameters, m._buffers):
                for t in box.values():
                    if t is not None:
                        self.tensor_places[id(t)] = self.tensor_places.get(id(t), 0) + 1
            kids = list(m._modules.items())
            for k, child in kids:
                if child is not None:
                    self.places[id(child)] = self.places.get(id(child), 0) + 1
            stack.extend((f'{name}.{k}' if name else k, c) for k, c in reversed(kids) if c is not None)

    def name(self, m):
        return None if m is None else self.names.get(id(m))


def bn_problem(bn):
    """Why a BN cannot be folded into any layer, or None."""
    if type(bn) not in BN:
        return f'{type(bn).__name__} is a BatchNorm subclass (it may add behaviour a fold would drop)'
    if bn.training:
        return 'the BatchNorm is in training mode (its output uses batch statistics): call model.eval() first'
    if buffer(bn, 'running_mean') is None or buffer(bn, 'running_var') is None:
        return 'the BatchNorm has no running statistics (track_running_stats=False)'
    return None


def pair_problem(parent, layer, bn, index: ModelIndex):
    """Why this layer→BN pair cannot be folded whatever its wiring, or None (see the module docstring)."""
    why = bn_problem(bn)
    if why:
        return why
    if type(layer).forward is not _base(layer).forward or _overrides(layer):
        return f'{type(layer).__name__} overrides {", ".join(_overrides(layer)) or "forward"} of its torch class'
    p = layer._parameters
    if p.get('weight') is None or 'bias' not in p:
        return f'{type(layer).__name__} has no plain weight and bias slots (a parametrized weight?)'
    if isinstance(layer, nn.Linear):
        return ('a BatchNorm normalises dim 1, which is the Linear\'s output only for 2-d inputs, and the input '
                'rank is not known without running the model')
    if type(bn) is not nn.SyncBatchNorm and _RANK[_base(layer)] != _RANK[type(bn)]:
        return f'a {type(bn).__name__} after a {_base(layer).__name__}: the ranks differ'
    if bn.num_features != out_channels(layer):
        return f'the BatchNorm has {bn.num_features} channels, the layer {out_channels(layer)} outputs'
    if _hooked(parent, layer, bn):
        return 'a hook runs on the layer, the BatchNorm or their block'
    if index.places.get(id(layer), 0) > 1 or index.places.get(id(bn), 0) > 1:
        return 'the layer or the BatchNorm is registered at more than one place'
    tensors = [param(layer, 'weight'), param(layer, 'bias'), param(bn, 'weight'), param(bn, 'bias'),
               buffer(bn, 'running_mean'), buffer(bn, 'running_var')]
    if any(t is not None and index.tensor_places.get(id(t), 0) > 1 for t in tensors):
        return 'a tensor of the layer or the BatchNorm is shared with another module'
    return None


class Candidate:
    __slots__ = ('parent', 'layer', 'bn', 'key', 'how', 'why')

    def __init__(self, parent, layer, bn, key, how, why=None):
        self.parent, self.layer, self.bn, self.key, self.how, self.why = parent, layer, bn, key, how, why


def find_pairs(model: nn.Module):
    """(pairs to fold [(parent, layer, bn's key in parent or the BN for a block, how)], report)."""
    index = ModelIndex(model)
    found = {}  # id(bn) -> Candidate; one verdict per BN

    def offer(c):
        old = found.get(id(c.bn))
        if old is None or (old.why is not None and c.why is None):
            found[id(c.bn)] = c

    for m in index.modules:
        if isinstance(m, torch.jit.ScriptModule):
            continue
        kids = m._modules
        conv, bn = kids.get('conv'), kids.get('bn')
        if isinstance(conv, CONV) and isinstance(bn, nn.modules.batchnorm._BatchNorm):
            offer(Candidate(m, conv, bn, bn, 'block', None if known_block(m) else 'wiring'))
        if isinstance(m, nn.Sequential):
            items = list(kids.items())
            for (_, a), (name, b) in zip(items, items[1:]):
                if isinstance(a, CONV) and isinstance(b, nn.modules.batchnorm._BatchNorm):
                    offer(Candidate(m, a, b, name, 'seq', None if type(m).forward is nn.Sequential.forward
                                    else 'wiring'))
    for c in found.values():
        c.why = pair_problem(c.parent, c.layer, c.bn, index) or c.why
    leftover = [m for m in index.modules if type(m) in BN and id(m) not in found
                and buffer(m, 'running_mean') is not None]
    need_graph = any(not m.training for m in leftover) or any(
        c.why == 'wiring' or (c.how == 'seq' and c.why is None) for c in found.values())
    graph = _trace(index, found) if need_graph else None
    proof = graph is not None and not graph.why
    if graph is not None and graph.why:
        _LOG.debug('fuse_model: no traced graph (%s); only .conv/.bn blocks and Sequential neighbours are folded',
                   graph.why)
    for c in found.values():
        layer_name, bn_name = index.name(c.layer), index.name(c.bn)
        if c.why == 'wiring':  # no attribute rule knows it: the graph's verdict
            c.why = _graph_verdict(graph, index, c.layer, c.bn)
            c.how, c.key = 'seq', bn_name.rpartition('.')[2]
        elif c.why is None and proof and c.how == 'block':
            c.why = graph.block_problem(index.name(c.parent), layer_name, bn_name)
        elif c.why is None and proof:
            c.why = graph.edge_problem(layer_name, bn_name)
        elif c.why is None and c.how == 'seq' and graph is not None:
            _LOG.debug('fuse_model: %s -> %s folded on Sequential.forward alone (not traced: %s)', layer_name,
                       bn_name, graph.why)
    for bn in leftover:
        name = index.name(bn)
        parent = index.by_name[name.rpartition('.')[0]]
        layer, why = (None, bn_problem(bn)) if bn.training else _graph_layer(graph, index, bn)
        if why is None:
            why = pair_problem(parent, layer, bn, index) or graph.edge_problem(index.name(layer), name)
        found[id(bn)] = Candidate(parent, layer, bn, name.rpartition('.')[2], 'seq', why)
    pairs, folded = [], []
    skipped = [(None, name, 'a scripted submodule: left as it is') for name in index.scripted]
    for c in found.values():
        if c.why:
            _LOG.debug('fuse_model: %s -> %s left unfused: %s', index.name(c.layer), index.name(c.bn), c.why)
            skipped.append((index.name(c.layer), index.name(c.bn), c.why))
        else:
            pairs.append((c.parent, c.layer, c.bn if c.how == 'block' else c.key, c.how))
            folded.append((index.name(c.layer), index.name(c.bn)))
    if graph is not None and graph.why:
        skipped.append((None, None, graph.why))
    return pairs, {'folded': folded, 'skipped': skipped}


def _trace(index, found):
    """The traced graph, with the verified blocks kept opaque (their own forward wires them: fewer nodes)."""
    leaves = {index.name(c.parent) for c in found.values() if c.how == 'block' and c.why is None}
    return Traced(index.modules[0], leaves)


def _graph_layer(graph, index, bn):
    """(the layer that feeds the BN in the graph, None) or (None, why not)."""
    if graph is None or graph.why:
        return None, graph.why if graph is not None else 'not traced'
    name, why = graph.layer_of(index.name(bn))
    if why:
        return None, why
    layer = index.by_name.get(name)
    if not isinstance(layer, CONV):
        return None, 'its input is not the output of a Conv/ConvTranspose/Linear module'
    return layer, None


def _graph_verdict(graph, index, layer, bn):
    """For a pair whose wiring no attribute rule knows: the graph's verdict, or why there is none."""
    if graph is None or graph.why:
        return ('its forward() is not act(bn(conv(x))) or bn(conv(x)), and the model has no traced graph'
                + (f' ({graph.why})' if graph is not None and graph.why else ''))
    got, why = graph.layer_of(index.name(bn))
    if why:
        return why
    if got != index.name(layer):
        return 'the BatchNorm does not take the output of this layer'
    return graph.edge_problem(got, index.name(bn))
