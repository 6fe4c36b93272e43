"""Pure-torch twins of the compiled ops: the fallback on CPU/MPS/any device, and the tests' second opinion.

Each function has the same contract and numerics as its compiled op (same rounding steps, no FMA), built on
the fastest torch primitives (``torch._foreach_*``, broadcasting, ``count_nonzero``).
"""
from __future__ import annotations

import operator
from collections import defaultdict

import torch

from ._validate import check_ema_args, check_fold_args, check_fold_inplace

_LOW = (torch.float16, torch.bfloat16)


def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _decay_pair(decay, decay_tensor):
    """(d, 1 - d) as the kernels use them: 1 - d is formed in float64 before rounding, like the seed's Python."""
    if decay_tensor is None:
        return decay, 1.0 - decay
    d64 = decay_tensor.detach().to(torch.float64)
    return d64, 1.0 - d64


def ema_update_(ema, model, decay: float = 0.0, decay_tensor=None, mode: str = 'yolov5', batch=None) -> None:
    """ema[i] = decay * ema[i] + (1 - decay) * model[i], in place, math in fp32 (fp64 for fp64 EMA).

    mode 'yolov5': ``v *= d; v += (1 - d) * m`` with each product and the sum rounded once (no FMA).
    mode 'lerp': ``torch.lerp(v, m, 1 - d)``.
    ``batch``: an EmaBatch of these same lists, validated earlier; used while it still matches them.
    """
    if batch is None or not batch.matches(ema, model):
        check_ema_args(ema, model, decay, decay_tensor, mode)
        batch = EmaBatch(ema, model, validated=True)
    else:
        check_ema_args(ema[:1], model[:1], decay, decay_tensor, mode)  # the scalars (tensors: matched)
    batch.apply(decay, decay_tensor, mode)


_PTR = torch.Tensor.data_ptr
_DTYPE, _SHAPE = operator.attrgetter('dtype'), operator.attrgetter('shape')


class EmaBatch:
    """ema/model lists checked once and grouped by (device, dtypes) for the foreach calls.

    Validation (overlap spans above all) costs ~10 us a tensor in Python: 3 ms a call for yolov5n, more than
    the update itself. ``matches`` is the per-call proof that nothing changed since: the same list contents and,
    per tensor, the same data pointer, dtype and shape (C-level maps, ~0.3 us a tensor), which covers
    ``.to()``/``.half()``/``.data =`` swaps that keep the Parameter object (a new layout means new memory).
    """

    def __init__(self, ema, model, validated=False):
        if not validated:
            check_ema_args(ema, model, 0.5, None, 'yolov5')
        self.ema, self.model = list(ema), list(model)
        self.key = self._key(self.ema, self.model)
        groups = defaultdict(lambda: ([], []))
        for e, m in zip(self.ema, self.model):
            g = groups[(e.device, e.dtype, m.dtype)]
            g[0].append(e)
            g[1].append(m)
        self.groups = [(device, edt, mdt, es, ms) for (device, edt, mdt), (es, ms) in groups.items()]

    @staticmethod
    def _key(ema, model):
        ts = [*ema, *model]
        return list(map(_PTR, ts)), list(map(_DTYPE, ts)), list(map(_SHAPE, ts))

    def matches(self, ema, model) -> bool:
        return (len(ema) == len(self.ema) and all(map(operator.is_, ema, self.ema))
                and all(map(operator.is_, model, self.model)) and self._key(ema, model) == self.key)

    def apply(self, decay, decay_tensor, mode):
        d, omd = _decay_pair(decay, decay_tensor)
        for device, edt, mdt, es, ms in self.groups:
            op = _opmath(edt)
            if mdt != op:
                ms = [m.to(op) for m in ms]
            work = [e.to(op) for e in es] if edt != op else es
            dd, oo = d, omd
            if isinstance(d, torch.Tensor):
                dd, oo = d.to(device=device, dtype=op), omd.to(device=device, dtype=op)
            if mode == 'yolov5':
                tmp = torch._foreach_mul(ms, oo)  # (1 - d) * m rounded alone: add_(alpha=) may fuse (FMA)
                torch._foreach_mul_(work, dd)
                torch._foreach_add_(work, tmp)
            else:
                torch._foreach_lerp_(work, ms, oo if not isinstance(oo, torch.Tensor) else [oo] * len(ms))
            if work is not es:
                torch._foreach_copy_(es, work)


def count_zeros(tensors) -> torch.Tensor:
    """Number of elements equal to zero over all tensors, as an int64 0-d tensor (one host read by the caller)."""
    tensors = list(tensors)
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f'count_zeros expects a list of tensors, got {type(t).__name__}')
    if not tensors:
        return torch.zeros((), dtype=torch.int64)
    device = tensors[0].device
    for i, t in enumerate(tensors):
        if t.device != device:
            raise ValueError(f'count_zeros: tensors[{i}] is on {t.device}, tensors[0] on {device}')
    total = sum(t.numel() for t in tensors)
    nonzero = torch.stack([torch.count_nonzero(t).to(device) for t in tensors]).sum()
    return (total - nonzero).to(torch.int64)


def bn_scale_shift(bn_weight, bn_bias, mean, var, eps, bias, opmath):
    """Per-output-channel (scale, new bias) of folding BN into the preceding layer, in opmath."""
    # bn_weight / sqrt(var + eps) with a correctly rounded sqrt and division, as the kernels do. torch's
    # vectorised float32 sqrt can be 1 ulp off; a float64 sqrt rounded to float32 is exact for float32 input.
    std = (var.to(opmath) + eps).double().sqrt().to(opmath)
    scale = (torch.ones_like(std) if bn_weight is None else bn_weight.to(opmath)) / std
    b = -mean.to(opmath) if bias is None else bias.to(opmath) - mean.to(opmath)
    shift = b * scale
    if bn_bias is not None:
        shift = shift + bn_bias.to(opmath)
    return scale, shift


def channel_factor(scale, weight, transposed_groups: int):
    """Shape ``scale`` (one value per output channel) to broadcast over ``weight``.

    Conv/Linear weights hold output channels on axis 0. ConvTranspose weights are (in, out/groups, *k):
    output channel of element (i, j) is (i // (in/groups)) * (out/groups) + j.
    """
    tail = (1,) * (weight.dim() - 1)
    if transposed_groups == 0:
        return scale.view(-1, *tail)
    g = transposed_groups
    cin, opg = weight.shape[0], weight.shape[1]
    f = scale.view(g, 1, opg).expand(g, cin // g, opg).reshape(cin, opg)
    return f.view(cin, opg, *tail[1:])


def fold_conv_bn(weight, bias, bn_weight, bn_bias, mean, var, eps, transposed_groups, inplace=False):
    """Fold each BN into its conv: returns (weights, biases). With inplace=True the weights are overwritten."""
    check_fold_args(weight, bias, bn_weight, bn_bias, mean, var, eps, transposed_groups)
    if inplace:
        check_fold_inplace(weight, bias, bn_weight, bn_bias, mean, var)
    out_w, out_b = [], []
    for i, w in enumerate(weight):
        op = _opmath(w.dtype)
        scale, shift = bn_scale_shift(bn_weight[i], bn_bias[i], mean[i], var[i], eps[i], bias[i], op)
        f = channel_factor(scale, w, transposed_groups[i])
        if inplace:
            out_w.append(w.copy_(w.to(op) * f))
        else:
            out_w.append((w.to(op) * f).to(w.dtype))
        out_b.append(shift.to(w.dtype))
    return out_w, out_b
