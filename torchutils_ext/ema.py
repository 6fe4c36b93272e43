"""ModelEMA: the seed's exponential moving average of a model, updated by one fused op per device.

The seed walks ``state_dict()`` and issues two kernels per tensor every step. Here the tensor lists are built
once; each update checks (in C-level loops) that every tensor is still the one its module holds, rebuilds the
lists when a module was moved/cast/replaced, and hands all floating tensors to ``ema_update_`` in one call.
"""
from __future__ import annotations

import math
import numbers
import sys
from copy import deepcopy
from operator import getitem, is_

import torch
import torch.nn as nn

from . import _ops
from ._ops import ema_update_
from ._walk import modules_once
from .distributed import de_parallel
from .training import copy_attr


def _state_slots(module: nn.Module):
    """{state_dict key: (container dict, slot name)} for every parameter and persistent buffer, like state_dict."""
    slots = {}
    for prefix, m in module.named_modules():
        pre = prefix + '.' if prefix else ''
        for name, p in m._parameters.items():
            if p is not None:
                slots[pre + name] = (m._parameters, name)
        for name, b in m._buffers.items():
            if b is not None and name not in m._non_persistent_buffers_set:
                slots[pre + name] = (m._buffers, name)
    return slots


_SAME_ITEMS = getattr(_ops._C, 'same_items', None)  # None without the compiled extension


class ModelStructureError(KeyError, ValueError):
    """The model no longer has every entry of its EMA (a layer fused away, deleted or replaced). A KeyError, as
    the seed's update raises there, and a ValueError, with a readable message."""

    def __str__(self):
        return str(self.args[0]) if self.args else ''


def _module_tree(module: nn.Module):
    """(parent's _modules dict, name, child) for every submodule edge that leads to state. Part of the per-step
    identity check: a module deleted (``delattr(block, 'bn')``, ``del seq[1]``) or replaced leaves its tensors in
    its own dicts, where only its parent's ``_modules`` shows that it is gone. Edges to stateless subtrees
    (activations, pooling, upsampling) cannot lose EMA entries and are left out of the check."""
    stateful = {}

    def holds_state(m):
        got = stateful.get(id(m))
        if got is None:
            got = stateful[id(m)] = (any(p is not None for p in m._parameters.values())
                                     or any(b is not None for b in m._buffers.values())
                                     or any(c is not None and holds_state(c) for c in m._modules.values()))
        return got
    return [(m._modules, name, child) for m in modules_once(module) for name, child in m._modules.items()
            if child is not None and holds_state(child)]


def _is_dtensor(t) -> bool:
    mod = sys.modules.get('torch.distributed.tensor')  # not imported: no DTensor can exist, and no import cost
    return mod is not None and isinstance(t, mod.DTensor)


def _local(t):
    """The local shard of a DTensor (an FSDP2 parameter): the tensor the update writes, no collective."""
    return t._local_tensor if _is_dtensor(t) else t


def _check_shards(key, e, m):
    if not (_is_dtensor(e) and _is_dtensor(m)):
        raise TypeError(f'{key}: one of the EMA and the model holds a sharded (DTensor) tensor and the other a '
                        'plain one; shard both the same way (see ModelEMA) or neither')
    if e.placements != m.placements or e.device_mesh != m.device_mesh or e.shape != m.shape:
        raise ValueError(f'{key}: the EMA and model shards differ (placements {e.placements} vs {m.placements}, '
                         f'shape {tuple(e.shape)} vs {tuple(m.shape)}); shard both with the same fully_shard call')


def _copy_model(model):
    try:
        return deepcopy(model)
    except AssertionError as err:  # FSDP2 modules refuse deepcopy
        if any(_is_dtensor(p) for p in model.parameters()):
            raise TypeError('ModelEMA cannot copy a model already sharded with fully_shard (FSDP2 refuses '
                            'deepcopy). Build the EMA first, then shard both alike: ema = ModelEMA(model); '
                            'fully_shard(model); fully_shard(ema.ema). Updates then run on the local shards, '
                            'with no gathering.') from err
        raise


class _Plan:
    """Tensor lists for one (ema module, model module) pair, grouped by device, plus what proves them current."""

    def __init__(self, ema: nn.Module, model: nn.Module):
        self.ema_module, self.model_module = ema, model
        es, ms = _state_slots(ema), _state_slots(model)
        missing = [k for k in es if k not in ms]
        if missing:
            more = f' and {len(missing) - 5} more' if len(missing) > 5 else ''
            raise ModelStructureError(
                f"ModelEMA.update: the model has no entry for the EMA's {', '.join(missing[:5])}{more}. The model "
                'and its EMA differ in structure (a layer fused, deleted or replaced after the EMA was made?): '
                'fuse or change the model before ModelEMA(model), or build a new ModelEMA after the change.')
        self.dicts, self.keys, self.tensors = [], [], []
        for d, name, child in _module_tree(ema) + _module_tree(model):  # checked with the slots, each step
            self.dicts.append(d)
            self.keys.append(name)
            self.tensors.append(child)
        groups, self.ints, self.sharded = {}, ([], []), False
        seen = set()
        for k, (ed, en) in es.items():
            md, mn = ms[k]
            e, m = ed[en], md[mn]
            for d, n, t in ((ed, en, e), (md, mn, m)):
                self.dicts.append(d)
                self.keys.append(n)
                self.tensors.append(t)
            if id(e) in seen:  # tied weights: update the shared tensor once
                continue
            seen.add(id(e))
            if _is_dtensor(e) or _is_dtensor(m):
                _check_shards(k, e, m)
                self.sharded = True
            if e.dtype.is_floating_point:
                g = groups.setdefault(e.device, ([], []))
                g[0].append(e)
                g[1].append(m)
            else:
                self.ints[0].append(e)
                self.ints[1].append(m)
        # Parameters (not .detach() views) go in the lists: .to()/.half() swap their data in place, and the
        # lists must follow. Replaced buffers or parameters fail current() and rebuild the plan.
        self.groups = list(groups.values())
        self.caches = [{} for _ in self.groups]  # per group, for the pure-torch path's validated batch

    def _same_slots(self) -> bool:
        """Every slot still holds the tensor (every module edge the submodule) this plan holds; a removed slot
        counts as changed."""
        if _SAME_ITEMS is not None and not torch.compiler.is_compiling():  # dynamo cannot trace the C loop
            # C loop with prefetching, yolov5n after a flush: 175 -> 42 us
            return _SAME_ITEMS(self.dicts, self.keys, self.tensors)
        try:
            return all(map(is_, map(getitem, self.dicts, self.keys), self.tensors))
        except KeyError:
            return False

    def lists(self):
        """(ema, model) lists per group; sharded (DTensor) entries as their local shards, read fresh each call."""
        if not self.sharded:
            return self.groups
        return [([_local(e) for e in es], [_local(m) for m in ms]) for es, ms in self.groups]

    def current(self, ema: nn.Module, model: nn.Module) -> bool:
        return ema is self.ema_module and model is self.model_module and self._same_slots()


class ModelEMA:
    """Updated Exponential Moving Average (EMA) of everything in the model's state_dict (parameters, buffers).

    Same constructor, attributes (``ema``, ``updates``, ``decay``) and methods as the seed. Extra keywords:
    ``mode`` ('yolov5' bit-matches the seed's ``v *= d; v += (1 - d) * m``, 'lerp' matches ``torch.lerp``) and
    ``copy_buffers`` (timm's policy: copy non-float buffers such as ``num_batches_tracked``; the seed leaves them).

    FSDP2: build the EMA before sharding, then shard the model and ``ema.ema`` with the same ``fully_shard``
    calls; each update then works on the local shards of the DTensor parameters, without gathering.
    """

    def __init__(self, model, decay=0.9999, tau=2000, updates=0, *, mode='yolov5', copy_buffers=False):
        if mode not in ('yolov5', 'lerp'):
            raise ValueError(f"mode must be 'yolov5' or 'lerp', got {mode!r}")
        if isinstance(decay, bool) or not isinstance(decay, numbers.Real):
            raise TypeError(f'decay must be a number, got {type(decay).__name__}')
        decay = float(decay)  # numpy scalars too: the ramp then yields plain floats
        if not (math.isfinite(decay) and 0.0 <= decay <= 1.0):
            raise ValueError(f'decay must be in [0, 1], got {decay}')
        if not tau > 0:
            raise ValueError(f'tau must be > 0, got {tau}')
        self.ema = _copy_model(de_parallel(model)).eval()  # FP32 EMA
        self.updates = updates
        self.decay = lambda x: decay * (1 - math.exp(-x / tau))  # exponential ramp helps early epochs
        self.mode = mode
        self.copy_buffers = copy_buffers
        self._plan = None
        for p in self.ema.parameters():
            p.requires_grad_(False)

    def _plan_for(self, model):
        plan = self._plan
        if plan is None or not plan.current(self.ema, model):
            plan = self._plan = _Plan(self.ema, model)
        return plan

    def update(self, model):
        model = de_parallel(model)
        plan = self._plan_for(model)
        d = self.decay(self.updates + 1)
        for (ema_list, model_list), cache in zip(plan.lists(), plan.caches):
            # sharded lists are rebuilt each call (fresh local shards): no cache for them
            ema_update_(ema_list, model_list, d, self.mode, cache=None if plan.sharded else cache)
        if self.copy_buffers and plan.ints[0]:
            with torch.no_grad():
                torch._foreach_copy_([_local(t) for t in plan.ints[0]], [_local(t) for t in plan.ints[1]])
        self.updates += 1  # counted after success, so a failed update can be retried

    def update_attr(self, model, include=(), exclude=('process_group', 'reducer')):
        copy_attr(self.ema, model, include, exclude)

    def __getstate__(self):  # the plan holds live references; rebuild it after unpickling
        state = self.__dict__.copy()
        state['_plan'] = None
        return state
