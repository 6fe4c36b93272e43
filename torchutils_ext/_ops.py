"""Loads the compiled ops and picks a backend per call; the fake kernels live in ``_fake``.

Backend per call: the compiled op when the library loaded and has a kernel for the tensors' device, else the
pure-torch twin in ``_torch_ops``. ``TORCHUTILS_EXT_BACKEND=auto|ext|torch`` (or ``set_backend``/``use_backend``)
forces it; ``ext`` raises when the compiled op cannot serve.
"""
from __future__ import annotations

import contextlib
import numbers
import os

import torch

from . import _cuda_arch, _torch_ops, _validate
from ._load import build_info, load_compiled
from ._validate import check_guard, new_biases, tensor_list

OPS = ('ema_update_', 'fold_conv_bn', 'fold_conv_bn_', 'count_zeros')
BACKENDS = ('auto', 'ext', 'torch')

_C, _LOAD_ERROR = load_compiled()  # importing _C registers the ops with the dispatcher

COMPILED = _C is not None
_lib = torch.ops.torchutils_ext if COMPILED else None


def _check_backend(name):
    if name not in BACKENDS:
        raise ValueError(f'backend must be one of {BACKENDS}, got {name!r}')
    return name


_backend = _check_backend(os.environ.get('TORCHUTILS_EXT_BACKEND', 'auto').strip().lower() or 'auto')


def get_backend() -> str:
    return _backend


def set_backend(name: str) -> str:
    """Force 'ext' or 'torch' for every op ('auto' restores the default). Returns the previous setting."""
    global _backend
    prev, _backend = _backend, _check_backend(name)
    return prev


@contextlib.contextmanager
def use_backend(name: str):
    prev = set_backend(name)
    try:
        yield
    finally:
        set_backend(prev)


_SCHEMA_NAMES = {'ema_update_': 'ema_update_.Scalar'}  # the overload whose registration stands for the op


def _kernel_table():
    """{(op, device type): has a compiled kernel}, read once: the registrations do not change after the load, and
    a plain dict lookup is what torch.compile can trace (the dispatcher query is not)."""
    table = {}
    for op in OPS:
        for device_type, key in (('cpu', 'CPU'), ('cuda', 'CUDA')):
            table[(op, device_type)] = COMPILED and torch._C._dispatch_has_kernel_for_dispatch_key(
                f'torchutils_ext::{_SCHEMA_NAMES.get(op, op)}', key)
    return table


_KERNELS = _kernel_table()
_BUILT_ARCHS = (build_info() or {}).get('cuda_arch_list')


def _has_kernel(op: str, device_type: str) -> bool:
    return _KERNELS.get((op, device_type), False)


def use_ext(op: str, device: torch.device | str) -> bool:
    device_type = torch.device(device).type
    if _backend == 'torch':
        return False
    ok = _has_kernel(op, device_type)
    why = None
    if ok and device_type == 'cuda' and not torch.compiler.is_compiling():
        why = _cuda_arch.reason_not_served(torch.device(device), _BUILT_ARCHS)
        ok = why is None
    if _backend == 'ext' and not ok:
        why = why or _LOAD_ERROR or f'no {device_type} kernel was built'
        raise RuntimeError(f'TORCHUTILS_EXT_BACKEND=ext but the compiled {op} cannot serve {device_type}: {why}')
    return ok


def backend_info() -> dict:
    """What was built, and which path each op takes per device type."""
    info = {'compiled': COMPILED, 'load_error': _LOAD_ERROR, 'backend': _backend, 'torch': torch.__version__,
            'torch_cuda': torch.version.cuda, 'cuda_compiled': COMPILED and _has_kernel('ema_update_', 'cuda')}
    built = build_info()
    if built is not None:
        info['build'] = built
    info['ops'] = {op: {dev: ('ext' if _has_kernel(op, dev) and _backend != 'torch' else 'torch')
                        for dev in ('cpu', 'cuda')} for op in OPS}
    return info


if COMPILED:
    from . import _fake  # noqa: F401  (registers the fake kernels; ops.cpp names this module)
    # the kernels' pair rule decides which pairs the pure-torch twin rounds the seed's way
    _validate.SEED_ROUNDING_PAIRS = _validate.seed_rounding_pairs(_C.ema_pair_rule())


def _device_of(tensors, default='cpu'):
    return tensors[0].device if len(tensors) else torch.device(default)


def ema_update_(ema, model, decay, mode: str = 'yolov5', *, guard=None) -> None:
    """In-place EMA over matching tensor lists: ``ema[i] = d * ema[i] + (1 - d) * model[i]``. ``decay`` is a
    float or a 0-d tensor (read on the device: no host sync). ``guard``: an int64 tensor of 2 elements on the
    tensors' device; when given, an update in which a model value is NaN/Inf writes nothing, sets guard[0] to 1
    (else 0) and adds 1 to guard[1]. Stateless; ModelEMA's per-step path is its plan."""
    if isinstance(decay, numbers.Real) and not isinstance(decay, (int, float, bool)):
        decay = float(decay)  # a numpy scalar (np.float32(0.9999)), as the seed's arithmetic accepts
    decay_tensor = decay if isinstance(decay, torch.Tensor) else None
    d = 0.0 if decay_tensor is not None else decay
    if decay_tensor is None and (not isinstance(d, (int, float)) or isinstance(d, bool)):
        raise TypeError(f'decay must be a float or a 0-d tensor, got {type(d).__name__}')
    ema, model = tensor_list('ema', ema), tensor_list('model', model)  # TypeError, not the dispatcher's error
    check_guard(guard, _device_of(ema) if len(ema) else None)
    with torch.no_grad():
        if len(ema) and use_ext('ema_update_', _device_of(ema)):
            if decay_tensor is not None:
                _lib.ema_update_.Tensor(ema, model, decay_tensor, mode, guard)
            else:
                _lib.ema_update_.Scalar(ema, model, d, mode, guard)
        else:
            _torch_ops.ema_update_(ema, model, decay, mode, guard)


def count_zeros(tensors) -> torch.Tensor:
    if isinstance(tensors, torch.Tensor):  # list() would split it into rows
        raise TypeError('count_zeros takes a list of tensors, got a tensor')
    tensors = tensor_list('tensors', list(tensors))
    with torch.no_grad():
        if tensors and use_ext('count_zeros', _device_of(tensors)):
            return _lib.count_zeros(tensors)
        return _torch_ops.count_zeros(tensors)


def fold_conv_bn(weight, bias, bn_weight, bn_bias, mean, var, eps, transposed_groups, inplace=False):
    """Fold BN into conv/linear weights for many layers in one call. Returns (weights, biases)."""
    eps = [float(e) for e in eps]
    transposed_groups = [int(g) for g in transposed_groups]
    weight, mean, var = tensor_list('weight', weight), tensor_list('running_mean', mean), \
        tensor_list('running_var', var)
    bias, bn_weight, bn_bias = (tensor_list(name, xs, allow_none=True)
                                for name, xs in (('bias', bias), ('bn_weight', bn_weight), ('bn_bias', bn_bias)))
    with torch.no_grad():
        if len(weight) and use_ext('fold_conv_bn', _device_of(weight)):
            args = (bias, bn_weight, bn_bias, mean, var, eps, transposed_groups)
            if inplace:
                out_b = new_biases(weight, transposed_groups)  # right shape, dtype, device
                _lib.fold_conv_bn_(weight, out_b, *args)
                return list(weight), out_b
            return _lib.fold_conv_bn(weight, *args)
        return _torch_ops.fold_conv_bn(weight, bias, bn_weight, bn_bias, mean, var, eps, transposed_groups,
                                       inplace=inplace)
