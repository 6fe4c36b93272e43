"""Fake (meta) kernels of the compiled ops: output shapes and the checks that need no data, for torch.compile,
FakeTensor and opcheck. ``ops.cpp`` names this module (``set_python_module``), so torch knows where they live;
``_ops`` imports it once the library has loaded.
"""
from __future__ import annotations

import torch

from ._validate import check_guard, new_biases


def _one_device(op, device, **lists):
    """Fake kernels also run in eager mode when a meta tensor sits among real ones (the dispatcher picks the
    Meta key): that call must fail as the real kernels would, not return empty results or skip the write."""
    for name, ts in lists.items():
        for i, t in enumerate(ts):
            if t is not None and t.device != device:
                raise ValueError(f'{op}: {name}[{i}] is on {t.device}, expected {device} like the first tensor')


def _fold_devices(weight, *lists):
    if len(weight):
        _one_device('fold_conv_bn', weight[0].device, weight=weight,
                    **{f'argument {k}': ts for k, ts in enumerate(lists, 2)})


def _ema_fake(ema, model, decay, ema_mode='yolov5', guard=None):
    # what can be checked without data: the compiled kernels check the rest
    if len(ema) != len(model):
        raise ValueError(f'ema and model lists differ in length: {len(ema)} vs {len(model)}')
    for i, (e, m) in enumerate(zip(ema, model)):
        if e.shape != m.shape or e.device != m.device or e.device != ema[0].device:
            raise ValueError(f'ema[{i}] and model[{i}] differ in shape or device')
    if isinstance(decay, torch.Tensor) and len(ema) and decay.device not in (ema[0].device, torch.device('cpu')):
        # a meta decay tensor beside real lists lands here in eager mode: refuse, do not skip the update
        raise ValueError(f'decay tensor is on {decay.device}, the tensors on {ema[0].device}')
    check_guard(guard, ema[0].device if len(ema) else None)


torch.library.register_fake('torchutils_ext::ema_update_.Scalar')(_ema_fake)
torch.library.register_fake('torchutils_ext::ema_update_.Tensor')(_ema_fake)


@torch.library.register_fake('torchutils_ext::count_zeros')
def _count_fake(tensors):
    device = tensors[0].device if len(tensors) else torch.device('cpu')
    _one_device('count_zeros', device, tensors=tensors)
    return torch.empty((), dtype=torch.int64, device=device)


@torch.library.register_fake('torchutils_ext::fold_conv_bn')
def _fold_fake(weight, bias, bn_weight, bn_bias, mean, var, eps, transposed_groups):
    _fold_devices(weight, bias, bn_weight, bn_bias, mean, var)
    return [torch.empty_like(w) for w in weight], new_biases(weight, transposed_groups)


@torch.library.register_fake('torchutils_ext::fold_conv_bn_')
def _fold_inplace_fake(weight, bias_out, bias, bn_weight, bn_bias, mean, var, eps, transposed_groups):
    _fold_devices(weight, bias_out, bias, bn_weight, bn_bias, mean, var)
