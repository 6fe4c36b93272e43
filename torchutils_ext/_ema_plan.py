"""ModelEMA's plan: what one (EMA module, model module) pair holds, proven unchanged on every step, and one update
per step.

``make_plan`` picks one of three plans with one interface, ``step(ema, model, decay, guard=None) -> bool``: True
when the EMA was updated, False when the plan is stale (a module, slot or tensor changed since it was built, or
state was added) and nothing was written, so the owner builds a new plan. ``decay`` is a float or a 0-d tensor;
``guard`` the nonfinite guard of ``_ops.ema_update_``.

- ``CompiledPlan``: the step is one call into C++ (``_C.ema_plan_step``): the state watch (NOTE [state watch] in
  ``csrc/python/watch.h``) proves both trees unchanged and hands over their tensors, then the device kernels run.
- ``TorchPlan``: the same watch (its C++ form when the library is built, else ``Layout.read``, the Python twin)
  and the pure-torch update (``_torch_ops``), for devices or installs without the compiled kernels, and for
  ``TORCHUTILS_EXT_BACKEND=torch``.
- ``FreshListsPlan``: sharded (FSDP2 DTensor) models, whose local shards are handed to the stateless
  ``_ops.ema_update_``; also the plan built while ``torch.compile`` traces, which cannot trace into C++.

A plan references no tensor between steps (``torch.utils.swap_tensors``, used by ``.to()``/``.half()`` under
``torch.__future__.set_swap_module_params_on_conversion(True)`` and by ``load_state_dict(assign=True)``, refuses to
swap a referenced tensor), and lets go of the containers it watches as soon as either module is deleted.
"""
from __future__ import annotations

import sys
import weakref
from operator import getitem, itemgetter

import torch
import torch.nn as nn

from . import _ops, _torch_ops
from ._validate import check_decay, check_ema_args, check_guard

_C = _ops._C

# The entry kinds of NOTE [state watch] (the same numbers as StateWatch::Kind).
EDGE, NONE, TENSOR, SAME, LEN_DICT, LEN_SET = range(6)

# Bumped by nn.Module's global registration hooks on every parameter, buffer or submodule registered anywhere: a
# plan that sees it changed walks the whole EMA tree for added state (NOTE [state watch]).
GENERATION = [0]
_HOOKED = []


def _bump(module, name, value):
    GENERATION[0] += 1  # returns None: the registration goes on unchanged


def _watch_registrations():
    if not _HOOKED:
        mm = nn.modules.module
        _HOOKED.extend(reg(_bump) for reg in (mm.register_module_parameter_registration_hook,
                                              mm.register_module_buffer_registration_hook,
                                              mm.register_module_module_registration_hook))


class ModelStructureError(KeyError, ValueError):
    """The model no longer has every entry of its EMA (a layer fused away, deleted or replaced). A KeyError, as
    the seed's update raises there, and a ValueError, with a readable message."""

    def __str__(self):
        return str(self.args[0]) if self.args else ''


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


def _stateful():
    """A predicate: does a module hold a parameter or buffer, itself or below (memoised per layout)."""
    memo = {}

    def holds(m):
        got = memo.get(id(m))
        if got is None:
            got = memo[id(m)] = (any(p is not None for p in m._parameters.values())
                                 or any(b is not None for b in m._buffers.values())
                                 or any(c is not None and holds(c) for c in m._modules.values()))
        return got
    return holds


def _persistent(m):
    """(container, name, value, is_buffer) of a module's parameters and persistent buffers, as state_dict saves
    them (is_buffer rather than an identity test of the containers, which torch 2.11's dynamo cannot trace)."""
    nps = getattr(m, '_non_persistent_buffers_set', ())
    for name, v in m._parameters.items():
        yield m._parameters, name, v, False
    for name, v in m._buffers.items():
        if name not in nps:
            yield m._buffers, name, v, True


def _meta(t):
    """What "unchanged" means for a watched tensor (StateWatch::matches): the type, data pointer, dtype, device,
    sizes and strides (of the local shard for a DTensor)."""
    x = local(t)
    return type(t), x.data_ptr(), x.dtype, x.device, x.shape, x.stride()


class Layout:
    """The watch lists of one (EMA, model) pair (NOTE [state watch]), the slots of the tensors they lead to, and
    which slots the update pairs: ``groups`` ([(ema slots, model slots)] per device: the averaged entries) and
    ``copies`` (ema slots, model slots: the entries copied at each update, after the average). ``values`` holds
    the slots' tensors at build time, for the plans' constructors; ``forget()`` drops them.

    ``buffers``: 'average' (the seed: floating buffers averaged; integer ones copied when ``copy_ints``), 'copy'
    (every persistent buffer copied), 'keep' (buffers left as they are: parameters only).
    ``watch=False`` (under torch.compile, whose plans are used once): only the slot lists, no watch entries."""

    def __init__(self, ema: nn.Module, model: nn.Module, copy_ints: bool = False, watch: bool = True,
                 buffers: str = 'average'):
        if buffers not in ('average', 'copy', 'keep'):
            raise ValueError(f"buffers must be 'average', 'copy' or 'keep', got {buffers!r}")
        self.watching = watch
        self.ema_ref, self.model_ref = (weakref.ref(ema, self._died), weakref.ref(model, self._died)) if watch \
            else (lambda: ema, lambda: model)
        self.every_step, self.full, self.values, self.owner = [], [], [], None
        self.generation = GENERATION[0]
        self.buffer_keys = set()
        ema_keys = self._watch_ema(ema)
        model_keys = self._find_model(model, set(ema_keys))
        floats, copies, optional = [], [], []
        for k, s in ema_keys.items():
            floating = local(self.values[s]).dtype.is_floating_point
            policy = buffers if k in self.buffer_keys else 'average'  # parameters are averaged under every policy
            if policy == 'average' and floating:
                floats.append((k, s))
            elif policy == 'copy' and floating:  # also averaged, then overwritten: so the guard checks them too
                floats.append((k, s))
                copies.append((k, s))
            elif policy == 'copy' or (policy == 'average' and copy_ints):
                optional.append((k, s))
        missing = [k for k, _ in floats if k not in model_keys]
        if missing:
            more = f' and {len(missing) - 5} more' if len(missing) > 5 else ''
            raise ModelStructureError(
                f"ModelEMA.update: the model has no entry for the EMA's {', '.join(missing[:5])}{more}. The model "
                'and its EMA differ in structure (a layer fused, deleted or replaced after the EMA was made?): '
                'fuse or change the model before ModelEMA(model), or build a new ModelEMA after the change.')
        groups, self.sharded = {}, False
        for k, s in floats:
            e, m = self.values[s], model_keys[k][2]
            if is_dtensor(e) or is_dtensor(m):
                _check_shards(k, e, m)
                self.sharded = True
            g = groups.setdefault(local(e).device, ([], []))
            g[0].append(s)
            g[1].append(self._model_slot(model_keys[k]))
        self.groups = list(groups.values())
        self.copies = ([], [])
        # an integer entry the model lacks is left as it is (the seed never reads it)
        for k, s in copies + [(k, s) for k, s in optional if k in model_keys]:
            got = model_keys[k]
            e, m = local(self.values[s]), local(got[2])
            if e.shape != m.shape or e.device != m.device:
                raise ModelStructureError(f'ModelEMA.update (copied buffers): {k} is {tuple(e.shape)} on {e.device} '
                                          f'in the EMA and {tuple(m.shape)} on {m.device} in the model')
            self.copies[0].append(s)
            self.copies[1].append(self._model_slot(got))

    # -- building

    def _slot(self, t):
        self.values.append(t)
        return len(self.values) - 1

    def _add(self, entries, box, key, kind, arg=None, size=-1):
        if self.watching:
            if size >= 0 and entries and entries[-1][0] is box:
                size = -1  # a container's size is compared once per run of its entries
            entries.append((box, key, size, kind, arg))

    def _watch_ema(self, ema):
        """Entries for every EMA slot and edge, and {state_dict key: slot} of its tensors (a tied tensor once)."""
        holds, seen, keys = _stateful(), {}, {}
        every_step, full = self.every_step, self.full
        for prefix, m in ema.named_modules():
            pre = prefix + '.' if prefix else ''
            kids, nps = m._modules, getattr(m, '_non_persistent_buffers_set', None)
            for box in (m._parameters, m._buffers, kids):
                self._add(full, box, None, LEN_DICT, size=len(box))
            if isinstance(nps, set):
                self._add(full, nps, None, LEN_SET, size=len(nps))
            for name, child in kids.items():
                if child is None:
                    self._add(full, kids, name, NONE)
                    continue
                ref = weakref.ref(child) if self.watching else None
                self._add(full, kids, name, EDGE, ref)
                if holds(child):
                    self._add(every_step, kids, name, EDGE, ref, len(kids))
            for box, name, v, is_buffer in _persistent(m):
                if v is None:
                    self._add(every_step, box, name, NONE, size=len(box))
                elif id(v) in seen:  # tied weights: updated once
                    self._add(every_step, box, name, SAME, seen[id(v)], len(box))
                else:
                    s = seen[id(v)] = keys[pre + name] = self._slot(v)
                    self._add(every_step, box, name, TENSOR, s, len(box))
                    if is_buffer:
                        self.buffer_keys.add(pre + name)
        return keys

    def _find_model(self, model, wanted):
        """{key: (container, name, tensor)} of the model's entries the EMA has, and entries for the model's edges
        to state (a submodule deleted or replaced keeps its tensors in its own dicts; only its parent shows it)."""
        holds, found = _stateful(), {}
        for prefix, m in model.named_modules():
            pre = prefix + '.' if prefix else ''
            for name, child in m._modules.items():
                if child is not None and holds(child):
                    self._add(self.every_step, m._modules, name, EDGE, weakref.ref(child) if self.watching else None)
            for box, name, v, _ in _persistent(m):
                if v is not None and pre + name in wanted:
                    found[pre + name] = (box, name, v)
        return found

    def _model_slot(self, entry):
        box, name, v = entry
        s = self._slot(v)
        self._add(self.every_step, box, name, TENSOR, s)
        return s

    # -- lifetime

    def _died(self, _ref):  # the EMA or the model was deleted: let go of what they held
        owner = self.owner() if self.owner is not None else None
        self.every_step = self.full = self.values = None
        if owner is not None:
            owner.release()

    def forget(self):
        """Drop the build-time tensors (a plan keeps no tensor between steps)."""
        self.values = None

    # -- the Python twin of StateWatch::read

    def read(self, ema, model):
        """The slots' tensors now, or None when anything changed (NOTE [state watch])."""
        every_step = self.every_step
        if every_step is None or self.ema_ref() is not ema or self.model_ref() is not model:
            return None
        if self.generation != GENERATION[0]:
            if not self._walk(self.full, None):
                return None
            self.generation = GENERATION[0]
        now = [None] * len(self.metas)
        return now if self._walk(every_step, now) else None

    def _walk(self, entries, now):
        metas = self.metas
        for box, key, size, kind, arg in entries:
            if size >= 0 and len(box) != size:
                return False
            if kind >= LEN_DICT:
                continue
            try:
                got = box[key]
            except KeyError:
                return False
            if kind == EDGE:
                if got is None or got is not arg():
                    return False
            elif kind == NONE:
                if got is not None:
                    return False
            elif kind == TENSOR:
                if not isinstance(got, torch.Tensor) or _meta(got) != metas[arg]:
                    return False
                now[arg] = got
            elif now is not None and got is not now[arg]:
                return False
        return True

    def record(self):
        """The metadata the Python twin compares (StateWatch records its own)."""
        self.metas = [_meta(t) for t in self.values]


def _release_on_death(plan, layout):
    """The plan lets go of its watch (which holds the modules' containers) when either module is deleted."""
    layout.owner = weakref.ref(plan)


class FreshListsPlan:
    """The stateless ops on the tensors read each step (the local shards of DTensors; a traced step)."""

    def __init__(self, layout: Layout, mode: str):
        self.layout, self.mode, self.backend = layout, mode, _ops.get_backend()
        self.device = local(layout.values[layout.groups[0][0][0]]).device if layout.groups else None
        self.sharded, self.n_groups = layout.sharded, len(layout.groups)
        self.lists = [(itemgetter(*es), itemgetter(*ms)) for es, ms in layout.groups]
        self.copy_lists = (itemgetter(*layout.copies[0]), itemgetter(*layout.copies[1])) if layout.copies[0] \
            else None
        if layout.watching:
            layout.record()
            _release_on_death(self, layout)
        else:  # traced: used once, right now
            self.now = layout.values
        layout.forget()

    def release(self):
        self.layout = None

    def current(self, ema, model):
        """The slots' tensors now, or None."""
        layout = self.layout
        if layout is None or self.backend != _ops.get_backend():
            return None
        return layout.read(ema, model) if layout.watching else self.now

    def copies(self, now):
        if self.copy_lists is None:
            return None
        return _as_list(self.copy_lists[0](now)), _as_list(self.copy_lists[1](now))

    def step(self, ema, model, decay, guard=None) -> bool:
        now = self.current(ema, model)
        if now is None:
            return False
        copies = self.copies(now)
        with torch.no_grad():  # the seed updates under no_grad: an EMA whose parameters require grad is written
            for get_e, get_m in self.lists:
                _ops.ema_update_([local(e) for e in _as_list(get_e(now))], [local(m) for m in _as_list(get_m(now))],
                                 decay, self.mode, guard=guard)
            if copies is not None:
                copy_entries(*copies, decay, guard)
        return True


def _as_list(got):
    """itemgetter of one index returns the item, of several a tuple."""
    return list(got) if isinstance(got, tuple) else [got]


def copy_entries(es, ms, decay, guard):
    """The copied entries (copy_buffers' integer buffers, buffers='copy'), after the average of the same step. A
    step that averaged nothing leaves them too: one with decay exactly 1 (update_every_n_steps), a device decay
    outside [0, 1] ([decay tensor]), or one skipped by the guard (guard[0] == 1), decided on the device where only
    the device knows (the twin of copy_entries in csrc/ema_update/ema_plan.cpp)."""
    es, ms = [local(e) for e in es], [local(m) for m in ms]
    host = not torch.compiler.is_compiling()
    hold = None  # a 0-d bool on the device: leave them this step
    if isinstance(decay, torch.Tensor):
        if host and decay.device.type == 'cpu':
            if float(decay) == 1.0:  # a CPU read: no device sync
                return
        else:
            hold = ~((decay >= 0) & (decay < 1))  # 1, NaN or out of range: nothing averaged
    elif decay == 1.0:
        return
    if guard is not None:
        if host and guard.device.type == 'cpu':
            if int(guard[0]):
                return
        else:
            hold = guard[0].bool() if hold is None else hold | guard[0].bool()
    if hold is None:
        torch._foreach_copy_(es, ms)
        return
    ints = [(e, m) for e, m in zip(es, ms) if not (e.is_floating_point() or e.is_complex() or e.dtype == torch.bool)]
    for e, m in zip(es, ms):
        if e.is_floating_point() or e.is_complex() or e.dtype == torch.bool:  # exact, where 0 * inf would be NaN
            e.copy_(torch.where(hold, e, m))
    if ints:  # e = e * hold + m * (1 - hold): three foreach calls for all
        ne, nm = [e for e, _ in ints], [m for _, m in ints]
        keep = hold.long()
        torch._foreach_mul_(ne, keep)
        torch._foreach_add_(ne, torch._foreach_mul(nm, 1 - keep))


class TorchPlan(FreshListsPlan):
    """The pure-torch update of lists validated once; per step, the state watch."""

    def __init__(self, layout, mode):
        groups = [(_as_list(itemgetter(*es)(layout.values)), _as_list(itemgetter(*ms)(layout.values)))
                  for es, ms in layout.groups]
        for es, ms in groups:
            check_ema_args(es, ms, 0.5, None, mode)
        self.batches = [_torch_ops.EmaGroups(es, ms) for es, ms in groups]
        self.watch = None
        if _C is not None:
            self.watch = _C.watch_new(layout.ema_ref, layout.model_ref, layout.every_step, layout.full, GENERATION,
                                      len(layout.values))
        super().__init__(layout, mode)

    def release(self):
        super().release()
        self.watch = None

    def current(self, ema, model):
        if self.watch is None or self.backend != _ops.get_backend():
            return super().current(ema, model)
        return _C.watch_read(self.watch, ema, model)

    def step(self, ema, model, decay, guard=None) -> bool:
        now = self.current(ema, model)
        if now is None:
            return False
        decay, decay_tensor = (0.0, decay) if isinstance(decay, torch.Tensor) else (decay, None)
        copies = self.copies(now)
        lists = [(_as_list(get_e(now)), _as_list(get_m(now))) for get_e, get_m in self.lists]
        for es, ms in lists:
            check_decay(decay, decay_tensor, es[0].device, (*es, *ms, guard))
            check_guard(guard, es[0].device)
        with torch.no_grad():
            for batch, (es, ms) in zip(self.batches, lists):
                batch.apply(es, ms, decay, decay_tensor, self.mode, guard, self.ends)
            if copies is not None:
                copy_entries(*copies, decay if decay_tensor is None else decay_tensor, guard)
        return True


class CompiledPlan(FreshListsPlan):
    """One C++ call per step: ``_C.ema_plan_step`` proves the trees unchanged and runs the device kernels."""

    def __init__(self, layout, mode):
        ema, model = layout.ema_ref(), layout.model_ref()
        self.watch = _C.watch_new(layout.ema_ref, layout.model_ref, layout.every_step, layout.full, GENERATION,
                                  len(layout.values))
        self.handle = _C.ema_plan_new(self.watch, ema, model, [(list(es), list(ms)) for es, ms in layout.groups],
                                      (list(layout.copies[0]), list(layout.copies[1])), mode)
        super().__init__(layout, mode)

    def release(self):
        super().release()
        self.watch = self.handle = None

    def step(self, ema, model, decay, guard=None) -> bool:
        handle = self.handle
        return (handle is not None and self.backend == _ops.get_backend()
                and _C.ema_plan_step(handle, ema, model, decay, guard))


def make_plan(ema: nn.Module, model: nn.Module, mode: str, copy_ints: bool = False, buffers: str = 'average',
              ends: bool = True):
    """The plan for this pair on this backend. Under torch.compile: lists read now, nothing C++ to trace.
    ``ends``: whether a decay tensor may be exactly 0 or 1, which the pure-torch update must then select for on the
    device (a copy of the EMA per step; the kernels need nothing)."""
    compiling = torch.compiler.is_compiling()
    if not compiling:
        _watch_registrations()
    layout = Layout(ema, model, copy_ints, watch=not compiling, buffers=buffers)
    if layout.sharded or compiling:
        plan = FreshListsPlan(layout, mode)
    else:
        devices = [local(layout.values[es[0]]).device for es, _ in layout.groups]
        # use_ext raises for TORCHUTILS_EXT_BACKEND=ext when a device has no kernel
        compiled = _ops.COMPILED and all([_ops.use_ext('ema_update_', d) for d in devices])
        plan = (CompiledPlan if compiled else TorchPlan)(layout, mode)
    plan.key, plan.ends = (mode, copy_ints, buffers, ends), ends
    return plan
