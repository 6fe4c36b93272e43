"""ModelEMA: the seed's exponential moving average of a model, updated by one fused op per device.

The seed walks ``state_dict()`` and issues two kernels per tensor every step. Here a plan (``_ema_plan``) holds
the tensor lists, built once; each update is one step of the plan, which proves that every module slot and
tensor is still what it was and updates all floating tensors, or answers "stale" (a module was moved, cast,
replaced) and is rebuilt.
"""
from __future__ import annotations

import math
import numbers
from copy import deepcopy

import torch

from ._ema_plan import ModelStructureError, is_dtensor, local, make_plan
from ._ema_schedule import (Constant, DecayTable, HalfLife, SeedRamp, Warmup, device_decay, make_phases,
                            make_schedule)
from ._ema_swap import swap_weights
from ._torch_ops import has_float64
from ._validate import check_mode
from .distributed import de_parallel
from .training import copy_attr

__all__ = ['ModelEMA', 'ModelStructureError']


def _copy_model(model):
    try:
        return deepcopy(model)
    except AssertionError as err:  # FSDP2 modules refuse deepcopy
        if any(is_dtensor(p) for p in model.parameters()):
            raise TypeError('ModelEMA cannot copy a model already sharded with fully_shard (FSDP2 refuses '
                            'deepcopy). Build the EMA first, then shard both alike: ema = ModelEMA(model); '
                            'fully_shard(model); fully_shard(ema.ema). Updates then run on the local shards, '
                            'with no gathering.') from err
        raise


def _state_device(module):
    """The device of the module's first floating parameter or buffer (the CPU when it has none)."""
    for t in (*module.parameters(), *module.buffers()):
        if t.is_floating_point():
            return local(t).device
    return torch.device('cpu')


def _static(t):
    """A state tensor each update mutates in place, at one address for its life: marked for torch.compile, whose
    CUDA graphs (mode='reduce-overhead') otherwise skip a graph that mutates an input that is neither a parameter
    nor a buffer."""
    torch._dynamo.mark_static_address(t, guard=False)
    return t


def _counter(updates, device):
    """The capturable update counter: float64 (float32 on MPS), one element. NOTE: 1-d, not 0-d: torch 2.13's
    compiled graphs (aot_eager) drop in-place updates of 0-d float64 tensors."""
    return _static(torch.full((1,), float(updates), device=device,
                              dtype=torch.float64 if has_float64(device) else torch.float32))


def _guard_tensor(device):
    return _static(torch.zeros(2, dtype=torch.int64, device=device))


BUFFER_POLICIES = ('average', 'copy', 'keep')


def _exact_ends(schedule, phases):
    """Whether a step's decay may be exactly 0 (a copy) or 1 (no write). The kernels always copy or write nothing
    there; the pure-torch plan, which cannot branch on a device decay, then selects the exact values."""
    return phases is not None or not (isinstance(schedule, SeedRamp) and 0.0 < schedule.decay < 1.0)


class ModelEMA:
    """Updated Exponential Moving Average (EMA) of everything in the model's state_dict (parameters, buffers).

    Same constructor, attributes (``ema``, ``updates``, ``decay``) and methods as the seed. Extra keywords, all off
    by default (the default is the seed, bit for bit):

    - ``mode``: 'yolov5' bit-matches the seed's ``v *= d; v += (1 - d) * m``, 'lerp' matches ``torch.lerp``.
    - ``copy_buffers``: timm's policy, copy non-float buffers such as ``num_batches_tracked`` (the seed leaves
      them).
    - ``skip_nonfinite``: an update in which any floating model value is NaN or Inf leaves the whole EMA
      unchanged, decided on the device with no host sync (a check pass, then the update reads its flag).
      ``skipped`` says how many updates were skipped (reading it syncs). ``updates`` still counts every call, as
      the seed counts them: the host cannot know that a step was skipped without a sync, so the decay ramp
      advances as if it had happened (after the ramp's first few thousand steps the decay barely moves).
    - ``capturable``: the update counter lives in a device tensor and the decay is computed there, so a step that
      includes ``update`` can be captured in a CUDA graph (``torch.cuda.graph``,
      ``torch.compile(mode='reduce-overhead')``) and each replay advances it. ``updates`` reads the counter (a
      sync); setting it (``smart_resume``) writes it. The decay is the host's own value, looked up in a table of
      the schedule by the counter (bit-identical to ``capturable=False``; float32 on MPS), past the table's
      limit (``_ema_schedule.TABLE_LIMIT`` entries, ``RAMP_TABLE_LIMIT`` for the seed's ramp) computed by the
      formula on the device, whose exp/pow may differ in the last bit. A replaced ``ema.decay`` raises here: it cannot run on the device.
    - ``schedule``: the decay of the x-th averaging update. 'ramp': the seed's ``decay * (1 - exp(-x / tau))``;
      'warmup': timm's ``1 - (1 + x / warmup_gamma) ** -warmup_power`` clamped to [``min_decay``, ``decay``];
      'constant': ``decay``; 'half_life': torchtitan's ``2 ** (-1 / (half_life_fraction * x))``.
    - ``update_every_n_steps``: average on every n-th call only, the first included; the others write nothing.
    - ``update_after_step`` (timm, diffusers): calls 1 .. A + 1 copy the model into the EMA; averaging starts at
      call A + 2 with x = 1. ``updates`` counts every call; x counts the averaging updates.
    - ``buffers``: 'average' (the seed: floating buffers averaged like the parameters), 'copy' (every persistent
      buffer copied from the model at each update: timm's ``exclude_buffers``), 'keep' (parameters only: the EMA
      keeps the buffers it was built with, as torch's ``use_buffers=False``, NeMo and torchtitan).

    ``swap_ema_weights(model)`` is a context manager that evaluates the EMA's weights in the model and restores it.

    FSDP2: build the EMA before sharding, then shard the model and ``ema.ema`` with the same ``fully_shard``
    calls; each update then works on the local shards of the DTensor parameters, without gathering.
    """

    def __init__(self, model, decay=0.9999, tau=2000, updates=0, *, mode='yolov5', copy_buffers=False,
                 skip_nonfinite=False, capturable=False, schedule='ramp', min_decay=0.0, warmup_gamma=1.0,
                 warmup_power=2 / 3, half_life_fraction=0.05, update_every_n_steps=1, update_after_step=None,
                 buffers='average'):
        check_mode(mode)
        if isinstance(decay, bool) or not isinstance(decay, numbers.Real):
            raise TypeError(f'decay must be a number, got {type(decay).__name__}')
        decay = float(decay)  # numpy scalars too: the ramp then yields plain floats
        if not (math.isfinite(decay) and 0.0 <= decay <= 1.0):
            raise ValueError(f'decay must be in [0, 1], got {decay}')
        if isinstance(tau, bool) or not isinstance(tau, numbers.Real) or not tau > 0:
            raise ValueError(f'tau must be a number > 0, got {tau!r}')
        for name, flag in (('copy_buffers', copy_buffers), ('skip_nonfinite', skip_nonfinite),
                           ('capturable', capturable)):
            if not isinstance(flag, bool):
                raise TypeError(f'{name} must be True or False, got {flag!r}')
        if buffers not in BUFFER_POLICIES:
            raise ValueError(f'buffers must be one of {BUFFER_POLICIES}, got {buffers!r}')
        if copy_buffers and buffers == 'keep':
            raise ValueError("copy_buffers=True copies integer buffers, buffers='keep' leaves every buffer: choose one")
        sched = make_schedule(schedule, decay, tau, min_decay, warmup_gamma, warmup_power, half_life_fraction)
        self._phases = make_phases(update_every_n_steps, update_after_step)
        self.ema = _copy_model(de_parallel(model)).eval()  # FP32 EMA
        self._count = self._table = None  # capturable: the counter and the schedule's table, device tensors
        self._guard = None  # skip_nonfinite: int64 [skipped this step, skipped in all] on the EMA's device
        self.decay = self._schedule = sched  # the seed's ramp by default (exponential ramp to help early epochs)
        self._ramp = (decay, tau)
        self.updates = updates
        # made here, not at the first update: a compiled first update must find them as inputs to mutate
        device = _state_device(self.ema)
        if capturable:
            self._count = _counter(updates, device)
            self._table = DecayTable(sched, self._count)
        if skip_nonfinite:
            self._guard = _guard_tensor(device)
        self.mode = mode
        self.copy_buffers = copy_buffers
        self.buffers = buffers
        self.skip_nonfinite = skip_nonfinite
        self.capturable = capturable
        self._ends = _exact_ends(sched, self._phases)
        self._plan = None
        for p in self.ema.parameters():
            p.requires_grad_(False)

    @property
    def schedule(self) -> str:
        return {SeedRamp: 'ramp', Warmup: 'warmup', Constant: 'constant', HalfLife: 'half_life'}.get(
            type(self._schedule), 'custom')

    @property
    def update_every_n_steps(self) -> int:
        return 1 if self._phases is None else self._phases.every

    @property
    def update_after_step(self):
        return None if self._phases is None or self._phases.first == 1 else self._phases.first - 2

    @property
    def updates(self):
        c = self._count
        return self._updates if c is None else int(c.item())

    @updates.setter
    def updates(self, value):
        self._updates = value
        if self._count is not None:
            self._count.fill_(value)

    @property
    def skipped(self) -> int:
        """Updates skipped by ``skip_nonfinite`` (reading it syncs with the device)."""
        return 0 if self._guard is None else int(self._guard[1].item())


    def _step_args(self, plan, decay=None):
        """(decay, guard) for the next step on the plan's device; ``decay``: the host's, already computed."""
        if not (self.capturable or self.skip_nonfinite):
            return (self.decay(self._updates + 1) if decay is None else decay), None
        if plan.sharded or plan.n_groups > 1:
            raise ValueError('ModelEMA: skip_nonfinite and capturable need the EMA on one device, unsharded (a '
                             'guard on each FSDP2 rank would see only its own shard)')
        device = plan.device or torch.device('cpu')
        guard = None
        if self.skip_nonfinite:
            guard = self._guard
            if guard is None or guard.device != device:
                self._guard = guard = _guard_tensor(device) if guard is None else _static(guard.to(device))
        if not self.capturable:
            return (self.decay(self._updates + 1) if decay is None else decay), guard
        if self.decay is not self._schedule:
            raise ValueError('ModelEMA(capturable=True) computes the decay schedule on the device from its counter; '
                             'a replaced ema.decay cannot run there. Build the EMA with the decay and tau you want, '
                             'or use capturable=False for another schedule.')
        c = self._count
        if c is None or c.device != device:
            self._count = c = _counter(self.updates, device)
            self._table = DecayTable(self._schedule, c)
        return device_decay(c, self._schedule, self._table, self._phases), guard

    def update(self, model):
        model = de_parallel(model)
        decay = None
        if self._phases is not None and not self.capturable:  # which steps write, decided on the host
            x = self._phases.position(self._updates + 1)
            if x is None:  # not this step's turn: nothing written, nothing checked
                self._updates += 1
                return
            decay = self.decay(x) if x else 0.0  # 0: a copy step (the kernels copy exactly)
        key = (self.mode, self.copy_buffers, self.buffers, self._ends)
        if torch.compiler.is_compiling():  # traced: a plan made now and used once (no C++ to trace into)
            plan = make_plan(self.ema, model, *key)
            plan.step(self.ema, model, *self._step_args(plan, decay))
        else:
            plan = self._plan
            if plan is None or plan.key != key:
                self._plan = plan = make_plan(self.ema, model, *key)
            if not plan.step(self.ema, model, *self._step_args(plan, decay)):
                self._plan = plan = make_plan(self.ema, model, *key)
                if not plan.step(self.ema, model, *self._step_args(plan, decay)):
                    raise RuntimeError('ModelEMA.update: the model changed while its plan was built')
        # counted after success, so a failed update can be retried
        if self._count is not None:
            self._count.add_(1)
        else:
            self._updates += 1

    def swap_ema_weights(self, model, enabled=True):
        """A context manager (NeMo's ``swap_ema_weights``): inside it the model holds the EMA's values of every
        entry the EMA writes (``buffers='keep'``: the parameters only), and on leaving it, also by an exception,
        its own values again, bit for bit. Moves two copies of those entries' bytes in (the model's values into a
        scratch buffer, the EMA's into the model) and one out; the EMA is only read. Raises ModelStructureError,
        touching nothing, when the model's entries no longer match the EMA's (a layer fused, added, removed or
        reshaped since the EMA was made)."""
        return swap_weights(self.ema, de_parallel(model), self.buffers, self.copy_buffers, enabled)

    def update_attr(self, model, include=(), exclude=('process_group', 'reducer')):
        copy_attr(self.ema, model, include, exclude)

    def __getstate__(self):  # the plan holds live references; rebuild it after unpickling
        state = self.__dict__.copy()
        state['_plan'] = None
        return state

    def __setstate__(self, state):
        if 'updates' in state:  # pickled before updates became a property
            state['_updates'] = state.pop('updates')
        if '_seed_decay' in state:  # pickled before the schedules
            state['_schedule'] = state.pop('_seed_decay')
        for k, v in (('_count', None), ('_table', None), ('_guard', None), ('skip_nonfinite', False),
                     ('capturable', False), ('_schedule', state.get('decay')), ('_phases', None),
                     ('buffers', 'average')):
            state.setdefault(k, v)
        state.setdefault('_ends', _exact_ends(state['_schedule'], state['_phases']))
        if isinstance(state['_table'], torch.Tensor):  # the ramp's table before DecayTable: rebuilt
            state['_table'] = DecayTable(state['_schedule'], state['_count'])
        self.__dict__.update(state)
