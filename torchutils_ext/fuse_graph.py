"""Layer→BatchNorm pairs read from the traced graph (torch.fx), for models whose forward() wires them in ways the
attribute and Sequential rules cannot see: ResNet's ``bn1(conv1(x))``, torchvision's and timm's blocks.

A pair is a call of a Conv/ConvTranspose/Linear module whose output feeds exactly one call of an eval-mode
BatchNorm (an exact torch BN type with running statistics) and nothing else, where each module is called at one
place in the graph. Every other BN call is reported (debug log) with the reason it is left alone.

The graph comes from torch.fx.symbolic_trace only. torch.export (given example inputs) was measured as a fallback
for models fx cannot trace and is not used (figures: README, graph rule section):
- value-dependent control flow (``if y.sum() > 0``) stops export as it stops fx;
- what export adds is shape-dependent control flow, and there it records the branch the example input takes:
  its graph proves an edge only for inputs shaped like the example (or within the ranges it narrowed, which no
  public API tells apart from a conv's own size checks), while folding changes the model for every input. A
  forward that adds ``x`` before the BN from 7 pixels up exports at 6x6 with a bare conv->BN edge; folding it
  puts 8x8 outputs 1.6 off, 55% of their largest value (the ``ShapeWiring`` test model keeps its BN);
- it costs over an order of magnitude more than fx where both trace.
"""
from __future__ import annotations

import logging

import torch.fx as fx
import torch.nn as nn

_LOG = logging.getLogger('torchutils_ext')


def graph_pairs(model: nn.Module, layer_ok, bn_types, skip_bns=frozenset(), skips=None):
    """[(parent, layer, bn's name in parent)]; [] when the model cannot be traced (a debug line says why).

    ``layer_ok(parent, layer, bn)`` returns None when the pair may be folded, else the reason it may not (the
    rules the attribute pairs follow: plain forward, no hooks, one registration). BNs in ``skip_bns`` (ids) are
    already paired by the attribute rules. ``skips`` (a list) receives (layer or None, bn or None, reason) for each
    BN left alone."""
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception as e:  # data-dependent control flow, untraceable ops: the attribute rules still apply
        why = f'{type(model).__name__} cannot be traced by torch.fx ({type(e).__name__}: ' \
              f'{(str(e).splitlines() or [""])[0][:200]})'
        _LOG.debug('fuse_model: %s; only .conv/.bn blocks and Sequential neighbours are folded', why)
        if skips is not None:
            skips.append((None, None, why))
        return []
    modules = dict(model.named_modules(remove_duplicate=False))
    calls = {}
    for node in graph.nodes:
        if node.op == 'call_module':
            calls[node.target] = calls.get(node.target, 0) + 1
    found = []
    for node in graph.nodes:
        bn = modules.get(node.target) if node.op == 'call_module' else None
        if bn is None or type(bn) not in bn_types or id(bn) in skip_bns:
            continue
        src = node.args[0] if len(node.args) == 1 and not node.kwargs else None
        layer = modules.get(src.target) if isinstance(src, fx.Node) and src.op == 'call_module' else None
        parent_name, _, attr = node.target.rpartition('.')
        parent = modules[parent_name] if parent_name else model
        why = ('its input is not the output of a Conv/ConvTranspose/Linear module' if layer is None
               else 'the BatchNorm is in training mode' if bn.training
               else 'the layer output has other users' if len(src.users) != 1
               else 'the layer or the BatchNorm is called at more than one place'
               if calls[src.target] > 1 or calls[node.target] > 1
               else layer_ok(parent, layer, bn))
        if why:
            _LOG.debug('fuse_model: BatchNorm %s left unfused: %s', node.target, why)
            if skips is not None:
                skips.append((layer, bn, why))
            continue
        found.append((parent, layer, attr))
    return found
