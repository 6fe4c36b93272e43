"""Argument checks shared by the pure-torch path; the compiled ops check the same things in C++.

Everything is validated before anything is written, so a bad call leaves every tensor untouched.
"""
from __future__ import annotations

import bisect
import math

import torch

EMA_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _rounds_once(e, m) -> bool:
    """The Python copy of the kernels' pair rule (NOTE [pair rule], csrc/ema_update/ema_kind.h), for a build
    without _C: six pairs compute in fp32 (fp64 for fp64/fp64) and round once into the EMA; the other ten take the
    seed's own three rounding steps (each product in its operand's dtype, the sum in the wider one)."""
    return e == m or (e == torch.float32 and m in (torch.float16, torch.bfloat16))


def _name(dtype):
    return str(dtype).removeprefix('torch.')


# ((ema dtype name, model dtype name, rounds once), ...) in the order _C.ema_pair_rule() gives it
PYTHON_PAIR_RULE = tuple((_name(e), _name(m), _rounds_once(e, m)) for e in EMA_DTYPES for m in EMA_DTYPES)


def seed_rounding_pairs(rule) -> frozenset:
    return frozenset((getattr(torch, e), getattr(torch, m)) for e, m, once in rule if not once)


# Replaced by the library's own rule when _C loads (_ops.py); the twin reads it at each call.
SEED_ROUNDING_PAIRS = seed_rounding_pairs(PYTHON_PAIR_RULE)
MODES = ('yolov5', 'lerp')


def tensor_list(name, xs, allow_none=False):
    if isinstance(xs, torch.Tensor) or not isinstance(xs, (list, tuple)):
        raise TypeError(f'{name} must be a list of tensors, got {type(xs).__name__}')
    for i, x in enumerate(xs):
        if x is None and allow_none:
            continue
        if not isinstance(x, torch.Tensor):
            raise TypeError(f'{name}[{i}] must be a tensor, got {type(x).__name__}')
    return list(xs)


def _span(t):
    """[start, end) bytes of storage a tensor can touch (conservative for strided views)."""
    if t.numel() == 0:
        return None
    start = t.data_ptr()
    extent = sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride())) + 1
    return start, start + extent * t.element_size()


# Spans that intersect prove shared memory only for tensors that fill their span; strided views such as the two
# interleaved columns of one buffer intersect without sharing an element, and are compared element by element
# (up to EXACT_LIMIT elements; larger ones are refused as overlapping, the safe answer).
EXACT_LIMIT = 1 << 22


def _fills_span(t, span):
    return (span[1] - span[0]) == t.numel() * t.element_size() and torch._debug_has_internal_overlap(t) == 0


def _addresses(t):
    offsets = torch.zeros((), dtype=torch.int64)
    for size, stride in zip(t.shape, t.stride()):
        offsets = offsets.unsqueeze(-1) + torch.arange(size, dtype=torch.int64) * stride
    return t.data_ptr() + offsets.reshape(-1) * t.element_size()


def _share_memory(a, sa, b, sb):
    """Tensors a and b (spans sa, sb intersect): do they share an element?"""
    if _fills_span(a, sa) and _fills_span(b, sb):
        return True
    if (a.element_size() != b.element_size() or (a.data_ptr() - b.data_ptr()) % a.element_size()
            or max(a.numel(), b.numel()) > EXACT_LIMIT):
        return True
    return bool(torch.isin(_addresses(a), _addresses(b)).any())


def _shared(writes, reads=()):
    """True when two writes, or a write and a read, share memory. Sorted spans, then the exact test for the
    few pairs whose spans intersect."""
    ws = sorted((s, i) for i, s in enumerate(_span(t) for t in writes) if s is not None)
    for k, (s, i) in enumerate(ws):
        for kk in range(k + 1, len(ws)):
            s2, j = ws[kk]
            if s2[0] >= s[1]:
                break
            if _share_memory(writes[i], s, writes[j], s2):
                return True
    ends, top = [], 0
    for s, _ in ws:
        top = max(top, s[1])
        ends.append(top)  # the furthest end among spans starting at or before this one
    starts = [s[0] for s, _ in ws]
    for r in reads:
        sr = _span(r) if r is not None else None
        if sr is None:
            continue
        k = bisect.bisect_left(starts, sr[1]) - 1  # the last write starting before r ends
        while k >= 0 and ends[k] > sr[0]:
            s, i = ws[k]
            if s[1] > sr[0] and _share_memory(writes[i], s, r, sr):
                return True
            k -= 1
    return False


def check_mode(mode):
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def check_decay(decay, decay_tensor=None, device=None, tensors=()):
    """A float in [0, 1], or (decay_tensor) a 0-d float32/float64 tensor on ``device`` or the CPU that shares no
    memory with ``tensors`` (the EMA and model tensors, the guard). A CPU decay tensor's value is checked like a
    float (a host read); a device one's cannot be without a sync: see ``decay_is_valid``."""
    if decay_tensor is None:
        if not isinstance(decay, (int, float)) or isinstance(decay, bool):
            raise TypeError(f'decay must be a float, got {type(decay).__name__}')
        if not (math.isfinite(decay) and 0.0 <= decay <= 1.0):
            raise ValueError(f'decay must be a finite number in [0, 1], got {decay}')
        return
    if not isinstance(decay_tensor, torch.Tensor) or decay_tensor.dim() != 0:
        raise TypeError('decay tensor must be a 0-d tensor')
    if decay_tensor.dtype not in (torch.float32, torch.float64):
        raise TypeError(f'decay tensor must be float32 or float64, got {decay_tensor.dtype}')
    if device is not None and decay_tensor.device != device and decay_tensor.device.type != 'cpu':
        raise ValueError(f'decay tensor is on {decay_tensor.device}, the tensors on {device}')
    if decay_tensor.device.type == 'meta' or torch.compiler.is_compiling():  # no memory, no value to read
        return
    if decay_tensor.device.type == 'cpu':
        value = float(decay_tensor)
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise ValueError(f'decay must be a finite number in [0, 1], got {value} (a CPU decay tensor)')
    span = _span(decay_tensor)
    for t in tensors:
        s = _span(t) if t is not None and t.device == decay_tensor.device else None
        if s is not None and s[0] < span[1] and span[0] < s[1] and _share_memory(decay_tensor, span, t, s):
            raise ValueError('the decay tensor shares memory with an EMA or model tensor or the guard; it must '
                             'own its memory (the update reads it while it writes the EMA)')


def decay_is_valid(decay_tensor):
    """A 0-d bool tensor on the decay's device: whether its value is a number in [0, 1] (False for NaN). Where
    the value cannot be read without a sync (a device, or traced), an invalid one writes nothing, and a guard
    counts the step as skipped, as the kernels do (see [decay tensor] in csrc/ema_update/ema_args.h)."""
    return (decay_tensor >= 0) & (decay_tensor <= 1)


def check_guard(guard, device=None):
    """None, or the nonfinite guard: a contiguous int64 tensor of 2 elements (skipped now, skipped in all)."""
    if guard is None:
        return
    if not (isinstance(guard, torch.Tensor) and guard.dtype == torch.int64 and guard.shape == (2,)
            and guard.is_contiguous()):
        raise TypeError('guard must be a contiguous int64 tensor of 2 elements (skipped now, skipped in all), got '
                        f'{getattr(guard, "dtype", type(guard).__name__)} of shape {tuple(getattr(guard, "shape", ()))}')
    if device is not None and guard.device != device:
        raise ValueError(f'guard is on {guard.device}, the tensors on {device}')


def check_ema_args(ema, model, decay, decay_tensor, mode, guard=None):
    ema = tensor_list('ema', ema)
    model = tensor_list('model', model)
    if len(ema) != len(model):
        raise ValueError(f'ema and model lists differ in length: {len(ema)} vs {len(model)}')
    check_mode(mode)
    check_guard(guard, ema[0].device if ema else None)
    check_decay(decay, decay_tensor, ema[0].device if ema else None, (*ema, *model, guard))
    for i, (e, m) in enumerate(zip(ema, model)):
        if e.dtype not in EMA_DTYPES:
            raise TypeError(f'ema[{i}] has dtype {e.dtype}; EMA tensors must be float32/float16/bfloat16/float64')
        if m.dtype not in EMA_DTYPES:  # any float pair the seed's formula takes
            raise TypeError(f'model[{i}] has dtype {m.dtype}; model tensors under an EMA must be '
                            'float32/float16/bfloat16/float64')
        if e.shape != m.shape:
            raise ValueError(f'ema[{i}] shape {tuple(e.shape)} differs from model[{i}] shape {tuple(m.shape)}')
        if e.device != m.device or e.device != ema[0].device:
            raise ValueError(f'ema[{i}] ({e.device}) and model[{i}] ({m.device}) must be on one device, '
                             f'the device of ema[0] ({ema[0].device})')
    if ema and ema[0].device.type != 'meta' and not torch.compiler.is_compiling():  # traced: no real memory
        check_self_overlap(ema, 'ema_update_')
        if _shared(ema if guard is None else [*ema, guard]):
            raise ValueError('ema tensors overlap in memory: each EMA tensor must own its storage')
        if _shared(ema, model):
            raise ValueError('an ema tensor shares memory with a model tensor')


def out_channels(w, transposed_groups):
    """Output channels of a layer's weight: axis 0 (Conv/Linear), or axis 1 times the groups (ConvTranspose)."""
    return w.shape[1] * transposed_groups if transposed_groups else w.shape[0]


def new_biases(weight, transposed_groups):
    """Uninitialised bias outputs of the fold: one per layer, contiguous, the weight's dtype and device."""
    return [w.new_empty(out_channels(w, g)) for w, g in zip(weight, transposed_groups)]


def check_fold_args(weight, bias, bn_weight, bn_bias, mean, var, eps, transposed_groups):
    weight = tensor_list('weight', weight)
    lists = {'bias': tensor_list('bias', bias, True), 'bn_weight': tensor_list('bn_weight', bn_weight, True),
             'bn_bias': tensor_list('bn_bias', bn_bias, True), 'running_mean': tensor_list('running_mean', mean),
             'running_var': tensor_list('running_var', var)}
    n = len(weight)
    for name, xs in [*lists.items(), ('eps', eps), ('transposed_groups', transposed_groups)]:
        if len(xs) != n:
            raise ValueError(f'{name} has {len(xs)} entries, weight has {n}')
    for i, w in enumerate(weight):
        if not w.is_floating_point():
            raise TypeError(f'weight[{i}] has dtype {w.dtype}; only floating-point layers can be folded')
        if w.dim() < 2:
            raise ValueError(f'weight[{i}] must have at least 2 dims, got shape {tuple(w.shape)}')
        g = transposed_groups[i]
        if g < 0 or (g and w.shape[0] % g):
            raise ValueError(f'transposed_groups[{i}]={g} does not divide the {w.shape[0]} input channels')
        c = out_channels(w, g)
        for name, xs in lists.items():
            x = xs[i]
            if x is None:
                continue
            if x.dim() != 1 or x.numel() != c:
                raise ValueError(f'{name}[{i}] has shape {tuple(x.shape)}, expected ({c},) output channels')
            if not x.is_floating_point():
                raise TypeError(f'{name}[{i}] has dtype {x.dtype}; expected floating point')
            if x.device != w.device:
                raise ValueError(f'{name}[{i}] is on {x.device}, weight[{i}] on {w.device}')
        e = eps[i]
        if not (math.isfinite(e) and e >= 0):
            raise ValueError(f'eps[{i}] must be finite and >= 0, got {e}')


def check_self_overlap(tensors, what):
    """Outputs written in place must not have elements sharing memory (expand()ed, stride 0), as torch's own
    in-place ops refuse them: checked for all before the first write."""
    for i, t in enumerate(tensors):
        if t is not None and t.device.type != 'meta' and torch._debug_has_internal_overlap(t) == 1:
            raise ValueError(f'{what}: output {i} has elements that share memory (an expand()ed or stride-0 '
                             'tensor); it cannot be written in place')


def check_fold_inplace(weight, *reads):
    """In-place folding writes every weight: no two may share memory, nor a weight with a BN/bias input."""
    if not weight or weight[0].device.type == 'meta':
        return
    check_self_overlap(weight, 'fold_conv_bn_')
    if _shared(weight):
        raise ValueError('fold_conv_bn_: two weights overlap in memory; each must own its storage')
    if _shared(weight, [x for xs in reads for x in xs]):
        raise ValueError('fold_conv_bn_: a weight shares memory with a bias or BatchNorm tensor')
