"""ModelEMA's plan: the tensor lists of one (EMA module, model module) pair, built once, and one step per update.

``make_plan`` picks one of three plans with one interface, ``step(ema, model, decay, guard=None) -> bool``: True
when the EMA was updated, False when the plan is stale (a module, slot or tensor changed since it was built) and
nothing was written, so the owner builds a new plan. ``decay`` is a float or a 0-d tensor; ``guard`` the
nonfinite guard of ``_ops.ema_update_``.

- ``CompiledPlan``: the step is one call into C++ (``_C.ema_plan_step``), which proves the plan current and
  runs the device kernels (see [EMA plan] in ``csrc/ema_update/ema_plan.h``).
- ``TorchPlan``: the same checks and the pure-torch update (``_reference``), for devices or installs without
  the compiled kernels, and for ``TORCHUTILS_EXT_BACKEND=torch``.
- ``FreshListsPlan``: sharded (FSDP2 DTensor) models, whose local shards are read fresh each step and handed
  to the stateless ``_ops.ema_update_``; also the plan built while ``torch.compile`` traces, which cannot
  trace into C++.
"""
from __future__ import annotations

import sys
from operator import getitem, is_

import torch
import torch.nn as nn

from . import _ops, _reference
from ._validate import check_decay, check_ema_args, check_guard
from ._walk import modules_once


_SLOTS_UNCHANGED = getattr(_ops._C, 'slots_unchanged', None)  # None without the compiled extension


class ModelStructureError(KeyError, ValueError):
    """The model no longer has every entry of its EMA (a layer fused away, deleted or replaced). A KeyError, as
    the seed's update raises there, and a ValueError, with a readable message."""

    def __str__(self):
        return str(self.args[0]) if self.args else ''


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


def _module_tree(module: nn.Module):
    """(parent's _modules dict, name, child) for every submodule edge that leads to state. A module deleted
    (``delattr(block, 'bn')``, ``del seq[1]``) or replaced keeps its tensors in its own dicts: only its parent's
    ``_modules`` shows that it is gone. Edges to stateless subtrees (activations, pooling) cannot lose EMA
    entries and are left out of the per-step check."""
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


def is_dtensor(t) -> bool:
    mod = sys.modules.get('torch.distributed.tensor')  # not imported: no DTensor can exist, and no import cost
    return mod is not None and isinstance(t, mod.DTensor)


def local(t):
    """The local shard of a DTensor (an FSDP2 parameter): the tensor the update writes, no collective."""
    return t._local_tensor if is_dtensor(t) else t


def _check_shards(key, e, m):
    if not (is_dtensor(e) and is_dtensor(m)):
        raise TypeError(f'{key}: one of the EMA and the model holds a sharded (DTensor) tensor and the other a '
                        'plain one; shard both the same way (see ModelEMA) or neither')
    if e.placements != m.placements or e.device_mesh != m.device_mesh or e.shape != m.shape:
        raise ValueError(f'{key}: the EMA and model shards differ (placements {e.placements} vs {m.placements}, '
                         f'shape {tuple(e.shape)} vs {tuple(m.shape)}); shard both with the same fully_shard call')


class Layout:
    """The slots that prove a plan current, and the float tensor lists per device, of one (EMA, model) pair."""

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
        self.dicts, self.keys, self.values = [], [], []
        for d, name, child in _module_tree(ema) + _module_tree(model):
            self._watch(d, name, child)
        groups, self.ints, self.sharded, seen = {}, ([], []), False, set()
        for k, (ed, en) in es.items():
            md, mn = ms[k]
            e, m = ed[en], md[mn]
            self._watch(ed, en, e)
            self._watch(md, mn, m)
            if id(e) in seen:  # tied weights: update the shared tensor once
                continue
            seen.add(id(e))
            if is_dtensor(e) or is_dtensor(m):
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
        # plan must see the new data; replaced parameters or buffers fail the slot check.
        self.groups = list(groups.values())

    def _watch(self, d, key, value):
        self.dicts.append(d)
        self.keys.append(key)
        self.values.append(value)

    def current(self, ema, model) -> bool:
        """Same modules, and every slot and module edge still holds what it held (a removed slot: changed)."""
        if ema is not self.ema_module or model is not self.model_module:
            return False
        if _SLOTS_UNCHANGED is not None and not torch.compiler.is_compiling():  # dynamo cannot trace the C loop
            return _SLOTS_UNCHANGED(self.dicts, self.keys, self.values)
        try:
            return all(map(is_, map(getitem, self.dicts, self.keys), self.values))
        except KeyError:
            return False


class FreshListsPlan:
    """The stateless ops on lists read fresh each step (the local shards of DTensors)."""

    def __init__(self, layout: Layout, mode: str):
        self.layout, self.mode, self.backend = layout, mode, _ops.get_backend()
        groups = layout.groups
        self.device = groups[0][0][0].device if groups else None  # of the first group: ModelEMA's tensors live there

    def step(self, ema, model, decay, guard=None) -> bool:
        if not self.layout.current(ema, model):
            return False
        for es, ms in self.layout.groups:
            _ops.ema_update_([local(e) for e in es], [local(m) for m in ms], decay, self.mode, guard=guard)
        return True


class TorchPlan(FreshListsPlan):
    """The pure-torch update of lists validated once; per step, the slot check and a metadata check."""

    def __init__(self, layout, mode):
        super().__init__(layout, mode)
        for es, ms in layout.groups:
            check_ema_args(es, ms, 0.5, None, mode)
        self.batches = [_reference.EmaGroups(es, ms) for es, ms in layout.groups]

    def step(self, ema, model, decay, guard=None) -> bool:
        if not (self.backend == _ops.get_backend() and self.layout.current(ema, model)
                and all(b.unchanged() for b in self.batches)):
            return False
        decay, decay_tensor = (0.0, decay) if isinstance(decay, torch.Tensor) else (decay, None)
        for es, ms in self.layout.groups:
            check_decay(decay, decay_tensor, es[0].device, (*es, *ms, guard))
            check_guard(guard, es[0].device)
        for batch in self.batches:
            batch.apply(decay, decay_tensor, self.mode, guard)
        return True


class CompiledPlan(FreshListsPlan):
    """One C++ call per step: ``_C.ema_plan_step`` proves the plan current and runs the device kernels."""

    def __init__(self, layout, mode):
        super().__init__(layout, mode)
        self.handle = _ops._C.ema_plan_new(layout.ema_module, layout.model_module, layout.dicts, layout.keys,
                                           layout.values, [(list(es), list(ms)) for es, ms in layout.groups], mode)

    def step(self, ema, model, decay, guard=None) -> bool:
        return self.backend == _ops.get_backend() and _ops._C.ema_plan_step(self.handle, ema, model, decay, guard)


def make_plan(ema: nn.Module, model: nn.Module, mode: str):
    """The plan for this pair on this backend. Under torch.compile: lists read fresh, nothing C++ to trace."""
    layout = Layout(ema, model)
    if layout.sharded or torch.compiler.is_compiling():
        return FreshListsPlan(layout, mode)
    # use_ext raises for TORCHUTILS_EXT_BACKEND=ext when a device has no kernel
    if _ops.COMPILED and all([_ops.use_ext('ema_update_', es[0].device) for es, _ in layout.groups]):
        return CompiledPlan(layout, mode)
    return TorchPlan(layout, mode)
