"""The traced graph (torch.fx) that fuse_model uses as its proof of how forward() wires a layer to a BatchNorm.

``trace(model, leaves)`` traces a structural copy of the model: new module objects whose tensors are the model's
own, so that whatever forward() stores on a module while it is traced (a lazily built grid, a cache, a counter:
under fx, proxies) lands on the copy and the model stays exactly as it was. ``leaves`` (qualified names) are kept
opaque, as are scripted submodules. The graph counts as a proof only when ``_trace_safety`` finds that every branch
the traced code takes is taken the same way for every input; otherwise ``Traced.why`` says why not.

A layer→BN pair is proven (``Traced.edge_problem``) when every call of the BN takes the output of a call of the
layer and nothing else, every call of the layer feeds exactly one call of that BN and nothing else, neither
module's tensors are read other than by the calls (``get_attr`` nodes), and forward() reaches neither module other
than to call it.

The graph comes from torch.fx.symbolic_trace's tracer only. torch.export (given example inputs) was measured as a
fallback for models fx cannot trace and is not used (figures: benchmarks/README.md): value-dependent control flow
stops it as it stops fx; where control flow depends on shapes, export records the branch the example input takes,
so its graph proves an edge only for inputs shaped like the example, while folding changes the model for every
input (the ``ShapeWiring`` test model keeps its BN); and it costs over an order of magnitude more than fx.
"""
from __future__ import annotations

import inspect
from collections import Counter, defaultdict

import torch
import torch.fx as fx
import torch.nn as nn

from . import _trace_safety

_PER_MODULE_COPIED = ('_parameters', '_buffers', '_non_persistent_buffers_set')


def _copy_value(v):
    """One level of a mutable container, so that forward() appending to a list attribute touches the copy's."""
    if type(v) is list:
        return list(v)
    if type(v) is dict:
        return dict(v)
    if type(v) is set:
        return set(v)
    return v


def structural_copy(model: nn.Module) -> nn.Module:
    """New module objects over the same tensors: each module's attributes copied one level deep, its submodules
    copied the same way (a module registered twice stays one object), scripted submodules shared (opaque)."""
    copies = {}

    def copy(m):
        got = copies.get(id(m))
        if got is not None:
            return got
        if isinstance(m, torch.jit.ScriptModule):
            copies[id(m)] = m
            return m
        new = copies[id(m)] = object.__new__(type(m))
        d = {k: _copy_value(v) for k, v in m.__dict__.items()}
        d['_modules'] = {k: None if c is None else copy(c) for k, c in m._modules.items()}
        new.__dict__.update(d)
        return new
    return copy(model)


class _Tracer(fx.Tracer):
    def __init__(self, leaves):
        super().__init__()
        self.leaves = leaves
        self.executed = []  # (forward, parameters that held proxies) of every non-leaf module run
        self.reached = Counter()  # id(module) -> how often forward() read it as an attribute

    def is_leaf_module(self, m, qualname):
        return qualname in self.leaves or isinstance(m, torch.jit.ScriptModule) or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        if not self.is_leaf_module(m, self.path_of_module(m)):
            self.executed.append((forward, _trace_safety.proxy_params(forward, args, kwargs)))
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        if isinstance(attr_val, (nn.Module, torch.Tensor)):  # a tensor read need not become a node of its own
            self.reached[id(attr_val)] += 1
        return super().getattr(attr, attr_val, parameter_proxy_cache)


class Traced:
    """A traced graph of a model and what it proves (see the module docstring)."""

    def __init__(self, model: nn.Module, leaves=frozenset()):
        self.why = None
        copy = structural_copy(model)
        tracer = _Tracer(set(leaves))
        try:
            graph = tracer.trace(copy)
        except Exception as e:  # data-dependent control flow, untraceable ops: nothing is proven
            self.why = (f'{type(model).__name__} cannot be traced by torch.fx ({type(e).__name__}: '
                        f'{(str(e).splitlines() or [""])[0][:200]})')
            return
        root = inspect.signature(copy.forward).parameters  # fx hands a proxy to every parameter of the root
        executed = [(copy.forward, set(root)), *tracer.executed]
        self.why = _trace_safety.why_not_a_proof(executed)
        if self.why:
            return
        self.calls, self.attrs, self.reached = defaultdict(list), Counter(), Counter()
        by_copy = {}
        for name, m in copy.named_modules(remove_duplicate=False):
            by_copy.setdefault(id(m), name)
            for t in (*m._parameters.values(), *m._buffers.values()):
                if t is not None:
                    by_copy.setdefault(id(t), name + '.#tensor')  # a tensor read counts for its module
        for node in graph.nodes:
            if node.op == 'call_module':
                self.calls[node.target].append(node)
            elif node.op == 'get_attr':
                self.attrs[node.target.rpartition('.')[0]] += 1  # the module whose tensor is read
        for key, n in tracer.reached.items():
            name = by_copy.get(key)
            if name is None:
                continue
            if name.endswith('.#tensor'):
                self.attrs[name[:-len('.#tensor')]] += n
            else:
                self.reached[name] += n
        self.targets = [n.target for n in graph.nodes if n.op in ('call_module', 'get_attr')]

    def block_problem(self, block_name: str, *children: str):
        """For a block kept opaque (its own forward wires it): None when the graph shows no code reaching into
        it, else why not."""
        inside = block_name + '.'
        if any(t.startswith(inside) for t in self.targets) or any(self.reached[c] for c in children):
            return 'forward() reaches into the block (calls or reads its conv or bn directly)'
        return None

    def layer_of(self, bn_name: str):
        """The name of the module whose output every call of the BN takes, or (None, reason)."""
        calls = self.calls.get(bn_name, [])
        if not calls:
            return None, 'forward() never calls the BatchNorm'
        srcs = set()
        for node in calls:
            src = node.args[0] if len(node.args) == 1 and not node.kwargs else None
            if not (isinstance(src, fx.Node) and src.op == 'call_module'):
                return None, 'its input is not the output of a Conv/ConvTranspose/Linear module'
            srcs.add(src.target)
        if len(srcs) > 1:
            return None, 'its calls take the outputs of different layers'
        return srcs.pop(), None

    def edge_problem(self, layer_name: str, bn_name: str):
        """None when the graph proves layer→BN for every input, else why not."""
        for node in self.calls.get(layer_name, []):
            users = list(node.users)
            if not (len(users) == 1 and users[0].op == 'call_module' and users[0].target == bn_name):
                return 'the layer output has other users'
        for node in self.calls.get(bn_name, []):
            src = node.args[0] if len(node.args) == 1 and not node.kwargs else None
            if not (isinstance(src, fx.Node) and src.op == 'call_module' and src.target == layer_name):
                return 'the BatchNorm also takes other inputs'
        if not self.calls.get(layer_name):
            return 'forward() never calls the layer'
        if self.attrs[layer_name] or self.attrs[bn_name]:
            return 'forward() reads the tensors of the layer or the BatchNorm other than by calling it'
        for name in (layer_name, bn_name):
            if self.reached[name] > len(self.calls[name]):
                return 'forward() reaches the layer or the BatchNorm other than to call it'
        return None
