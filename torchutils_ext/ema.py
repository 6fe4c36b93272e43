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

from ._ema_plan import FreshListsPlan, ModelStructureError, is_dtensor, local, make_plan
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



class ModelEMA:
    """Updated Exponential Moving Average (EMA) of everything in the model's state_dict (parameters, buffers).

    Same constructor, attributes (``ema``, ``updates``, ``decay``) and methods as the seed. Extra keywords:
    ``mode`` ('yolov5' bit-matches the seed's ``v *= d; v += (1 - d) * m``, 'lerp' matches ``torch.lerp``) and
    ``copy_buffers`` (timm's policy: copy non-float buffers such as ``num_batches_tracked``; the seed leaves them).

    FSDP2: build the EMA before sharding, then shard the model and ``ema.ema`` with the same ``fully_shard``
    calls; each update then works on the local shards of the DTensor parameters, without gathering.
    """

    def __init__(self, model, decay=0.9999, tau=2000, updates=0, *, mode='yolov5', copy_buffers=False):
        check_mode(mode)
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

    def update(self, model):
        model = de_parallel(model)
        d = self.decay(self.updates + 1)
        plan = self._plan
        if torch.compiler.is_compiling():  # traced: the plan's Python checks and the stateless ops
            if plan is None or not FreshListsPlan.step(plan, self.ema, model, d):
                plan = make_plan(self.ema, model, self.mode)  # not kept: it runs at trace time only
                FreshListsPlan.step(plan, self.ema, model, d)
        elif plan is None or not plan.step(self.ema, model, d):
            self._plan = plan = make_plan(self.ema, model, self.mode)
            if not plan.step(self.ema, model, d):
                raise RuntimeError('ModelEMA.update: the model changed while its plan was built')
        ints = plan.layout.ints
        if self.copy_buffers and ints[0]:
            with torch.no_grad():
                torch._foreach_copy_([local(t) for t in ints[0]], [local(t) for t in ints[1]])
        self.updates += 1  # counted after success, so a failed update can be retried

    def update_attr(self, model, include=(), exclude=('process_group', 'reducer')):
        copy_attr(self.ema, model, include, exclude)

    def __getstate__(self):  # the plan holds live references; rebuild it after unpickling
        state = self.__dict__.copy()
        state['_plan'] = None
        return state
