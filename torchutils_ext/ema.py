"""ModelEMA: the seed's exponential moving average of a model, updated by one fused op per device.

The seed walks ``state_dict()`` and issues two kernels per tensor every step. Here a plan (``_ema_plan``) holds
the tensor lists, built once; each update is one step of the plan, which proves that every module slot and
tensor is still what it was and updates all floating tensors, or answers "stale" (a module was moved, cast,
replaced) and is rebuilt.
"""
from __future__ import annotations

import functools
import math
import numbers
from copy import deepcopy

import torch

from ._ema_plan import ModelStructureError, is_dtensor, local, make_plan
from ._reference import has_float64
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


# Past this many entries (tau above ~110,000 updates) the capturable ramp is computed on the device instead of read
# from the seed's own values (see _device_decay).
RAMP_TABLE_LIMIT = 1 << 22


@functools.lru_cache(maxsize=16)
def _seed_ramp(decay: float, tau: float):
    """The seed's decays (``SeedRamp``) for x = 0, 1, ... as the host computes them, up to the first that equals
    ``decay``: every later one does too, the table's last entry. None when that takes more than RAMP_TABLE_LIMIT
    entries."""
    seed, out = SeedRamp(decay, tau), []
    for x in range(RAMP_TABLE_LIMIT):
        out.append(seed(x))
        if out[-1] == decay:  # the ramp only rises (rounding is monotone) and never passes decay: flat from here
            return out
    return None


class SeedRamp:
    """The seed's decay ramp, ``decay * (1 - math.exp(-x / tau))`` (the same expression, so the same bits), as an
    object rather than the seed's lambda, so that a ModelEMA pickles (``torch.save(ema)``)."""

    __slots__ = ('decay', 'tau')

    def __init__(self, decay, tau):
        self.decay, self.tau = decay, tau

    def __call__(self, x):
        return self.decay * (1 - math.exp(-x / self.tau))

    def __reduce__(self):
        return SeedRamp, (self.decay, self.tau)


def _ramp_table(decay, tau, count):
    """The seed's ramp (``_seed_ramp``) as a tensor beside the counter, or None past RAMP_TABLE_LIMIT."""
    ramp = _seed_ramp(decay, tau)
    return None if ramp is None else torch.tensor(ramp, dtype=count.dtype, device=count.device)


def _device_decay(count, table, decay, tau):
    """The decay of update ``count + 1`` as a 0-d device tensor, with no host sync: the seed's own value looked up
    by the counter (bit-identical to the host ramp for every update), or without a table the formula in float64
    tensor ops (the device's exp may differ from the host's in the last bit)."""
    if table is None:
        return torch.rsub(torch.exp(torch.neg(count + 1).div_(tau)), 1).mul_(decay).view(())
    return table.index_select(0, (count + 1).clamp_(max=table.numel() - 1).long()).view(())


class ModelEMA:
    """Updated Exponential Moving Average (EMA) of everything in the model's state_dict (parameters, buffers).

    Same constructor, attributes (``ema``, ``updates``, ``decay``) and methods as the seed. Extra keywords:

    - ``mode``: 'yolov5' bit-matches the seed's ``v *= d; v += (1 - d) * m``, 'lerp' matches ``torch.lerp``.
    - ``copy_buffers``: timm's policy, copy non-float buffers such as ``num_batches_tracked`` (the seed leaves
      them).
    - ``skip_nonfinite``: an update in which any floating model value is NaN or Inf leaves the whole EMA
      unchanged, decided on the device with no host sync (a check pass, then the update reads its flag).
      ``skipped`` says how many updates were skipped (reading it syncs). ``updates`` still counts every call, as
      the seed counts them: the host cannot know that a step was skipped without a sync, so the decay ramp
      advances as if it had happened (after the ramp's first few thousand steps the decay barely moves).
    - ``capturable``: the update counter lives in a device tensor and the decay ramp is computed there, so a
      step that includes ``update`` can be captured in a CUDA graph (``torch.cuda.graph``,
      ``torch.compile(mode='reduce-overhead')``) and each replay advances it. ``updates`` reads the counter (a
      sync); setting it (``smart_resume``) writes it. The decay is the seed's own host value, looked up in a
      table of the ramp by the counter (bit-identical to ``capturable=False`` for every update; float32 on MPS),
      past ``RAMP_TABLE_LIMIT`` entries (tau above ~110,000) computed by the formula on the device, whose exp
      may differ in the last bit. A replaced ``ema.decay`` raises here: it cannot run on the device.

    FSDP2: build the EMA before sharding, then shard the model and ``ema.ema`` with the same ``fully_shard``
    calls; each update then works on the local shards of the DTensor parameters, without gathering.
    """

    def __init__(self, model, decay=0.9999, tau=2000, updates=0, *, mode='yolov5', copy_buffers=False,
                 skip_nonfinite=False, capturable=False):
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
        self.ema = _copy_model(de_parallel(model)).eval()  # FP32 EMA
        self._count = self._table = None  # capturable: the counter and the seed's ramp, device tensors
        self._guard = None  # skip_nonfinite: int64 [skipped this step, skipped in all] on the EMA's device
        self.updates = updates
        # made here, not at the first update: a compiled first update must find them as inputs to mutate
        device = _state_device(self.ema)
        if capturable:
            self._count = _counter(updates, device)
            self._table = _ramp_table(decay, tau, self._count)
        if skip_nonfinite:
            self._guard = _guard_tensor(device)
        self.decay = self._seed_decay = SeedRamp(decay, tau)  # exponential ramp (to help early epochs)
        self._ramp = (decay, tau)
        self.mode = mode
        self.copy_buffers = copy_buffers
        self.skip_nonfinite = skip_nonfinite
        self.capturable = capturable
        self._plan = None
        for p in self.ema.parameters():
            p.requires_grad_(False)

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

    def _step_args(self, plan):
        """(decay, guard) for the next step on the plan's device."""
        if not (self.capturable or self.skip_nonfinite):
            return self.decay(self._updates + 1), None
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
            return self.decay(self._updates + 1), guard
        if self.decay is not self._seed_decay:
            raise ValueError('ModelEMA(capturable=True) computes the seed\'s decay ramp on the device from its '
                             'counter; a replaced ema.decay cannot run there. Build the EMA with the decay and tau '
                             'you want, or use capturable=False for another schedule.')
        c = self._count
        if c is None or c.device != device:
            self._count = c = _counter(self.updates, device)
            self._table = _ramp_table(*self._ramp, c)
        return _device_decay(c, self._table, *self._ramp), guard

    def update(self, model):
        model = de_parallel(model)
        key = (self.mode, self.copy_buffers)
        if torch.compiler.is_compiling():  # traced: a plan made now and used once (no C++ to trace into)
            plan = make_plan(self.ema, model, *key)
            plan.step(self.ema, model, *self._step_args(plan))
        else:
            plan = self._plan
            if plan is None or plan.key != key:
                self._plan = plan = make_plan(self.ema, model, *key)
            if not plan.step(self.ema, model, *self._step_args(plan)):
                self._plan = plan = make_plan(self.ema, model, *key)
                if not plan.step(self.ema, model, *self._step_args(plan)):
                    raise RuntimeError('ModelEMA.update: the model changed while its plan was built')
        # counted after success, so a failed update can be retried
        if self._count is not None:
            self._count.add_(1)
        else:
            self._updates += 1

    def update_attr(self, model, include=(), exclude=('process_group', 'reducer')):
        copy_attr(self.ema, model, include, exclude)

    def __getstate__(self):  # the plan holds live references; rebuild it after unpickling
        state = self.__dict__.copy()
        state['_plan'] = None
        return state

    def __setstate__(self, state):
        if 'updates' in state:  # pickled before updates became a property
            state['_updates'] = state.pop('updates')
        for k, v in (('_count', None), ('_table', None), ('_guard', None), ('skip_nonfinite', False),
                     ('capturable', False), ('_seed_decay', state.get('decay'))):
            state.setdefault(k, v)
        self.__dict__.update(state)
