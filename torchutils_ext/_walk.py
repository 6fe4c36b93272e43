"""Walks of a module tree equal to ``model.modules()`` / ``model.parameters()``: same order (pre-order, each
object once), without named_modules' per-module prefix strings and generator frames. On yolov5l's 468
modules ``list(model.parameters())`` is a measurable share of a whole ``sparsity()`` call."""
from __future__ import annotations

import torch.nn as nn

_M = nn.Module


def _plain(tp) -> bool:
    """The class walks its tree the way nn.Module does (no override that could change what is yielded)."""
    return (tp.named_modules is _M.named_modules and tp.modules is _M.modules and tp.parameters is _M.parameters
            and tp.named_parameters is _M.named_parameters and tp._named_members is _M._named_members)


def modules_once(model: nn.Module) -> list:
    """``list(model.modules())``; falls back to it when a class in the tree overrides how it is walked."""
    out, seen, stack = [], set(), [model]
    while stack:
        m = stack.pop()
        if m is None or id(m) in seen:
            continue
        seen.add(id(m))
        out.append(m)
        kids = m._modules
        if kids:
            stack.extend(reversed(kids.values()))
    if not all(map(_plain, set(map(type, out)))):
        return list(model.modules())
    return out


def parameters_once(model: nn.Module) -> list:
    """``list(model.parameters())``: every module's ``_parameters`` in walk order, each parameter once."""
    out, seen = [], set()
    for m in modules_once(model):
        for p in m._parameters.values():
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out
