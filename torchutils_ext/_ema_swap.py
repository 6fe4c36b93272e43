"""ModelEMA.swap_ema_weights: the EMA's values evaluated in the model, and the model's own restored afterwards.

The model's tensors are written in place (copies), never re-pointed: a captured CUDA graph, a compiled model, an
optimizer and autograd's version checks all keep seeing the same tensors. Re-pointing them (``.data`` swaps, as
some peers do) moves no bytes but would leave a graph captured over the old addresses evaluating the training
weights, which nothing could detect; so every entry is copied: two copies in (the model's values into a scratch
buffer, the EMA's into the model) and one out. The EMA is only read, so an exception leaves it as it was.
"""
from __future__ import annotations

import contextlib

import torch

from ._ema_plan import ModelStructureError, _persistent, local


def _entries(module, buffers, copy_ints):
    """{state_dict key: local tensor} of the entries the EMA writes under the buffer policy, each tensor once."""
    out, seen = {}, set()
    for prefix, m in module.named_modules():
        pre = prefix + '.' if prefix else ''
        for box, name, v, _ in _persistent(m):
            if v is None or id(v) in seen:
                continue
            t = local(v)
            if box is m._parameters:
                take = t.is_floating_point()
            elif buffers == 'keep':
                take = False
            else:
                take = buffers == 'copy' or t.is_floating_point() or copy_ints
            if take:
                seen.add(id(v))
                out[pre + name] = t
    return out


def _pairs(ema, model, buffers, copy_ints):
    """(EMA tensors, model tensors) to swap, or ModelStructureError naming what differs."""
    es, ms = _entries(ema, buffers, copy_ints), _entries(model, buffers, copy_ints)
    missing, extra = [k for k in es if k not in ms], [k for k in ms if k not in es]
    bad = [k for k in es if k in ms and (es[k].shape != ms[k].shape or es[k].device != ms[k].device)]
    if missing or extra or bad:
        what = '; '.join(f'{label}: {", ".join(ks[:5])}{" ..." if len(ks) > 5 else ""}' for label, ks in
                         (('missing in the model', missing), ('not in the EMA', extra),
                          ('other shape or device', bad)) if ks)
        raise ModelStructureError(f'ModelEMA.swap_ema_weights: the model no longer matches its EMA ({what}); '
                                  'nothing was swapped. Build a new ModelEMA after changing the model.')
    keys = list(es)
    return [es[k] for k in keys], [ms[k] for k in keys]


@contextlib.contextmanager
def swap_weights(ema, model, buffers, copy_ints, enabled=True):
    if not enabled:
        yield model
        return
    es, ms = _pairs(ema, model, buffers, copy_ints)
    if not torch.is_inference_mode_enabled() and any(m.is_inference() for m in ms):
        raise RuntimeError('ModelEMA.swap_ema_weights: the model holds inference tensors, which can be written only '
                           'inside torch.inference_mode(); enter it first. Nothing was swapped.')
    with torch.no_grad():
        saved = [torch.empty_like(m) for m in ms]
        torch._foreach_copy_(saved, ms)
        try:
            torch._foreach_copy_(ms, es)
        except BaseException:
            torch._foreach_copy_(ms, saved)
            raise
    try:
        yield model
    finally:
        with torch.no_grad():
            torch._foreach_copy_(ms, saved)
