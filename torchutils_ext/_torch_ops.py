"""The pure-torch backend: one twin per compiled op, the path on CPU/MPS/any device without the built library.
Tuned, not an oracle: the tests compare both backends with their own float64 references.

Each function has the same contract and numerics as its compiled op (same rounding steps, no FMA), built on
the fastest torch primitives (``torch._foreach_*``, broadcasting, ``count_nonzero``).
"""
from __future__ import annotations

import threading
from collections import defaultdict

import torch

from . import _validate
from ._validate import check_ema_args, check_fold_args, check_fold_inplace, decay_is_valid

_LOW = (torch.float16, torch.bfloat16)


def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def has_float64(device: torch.device) -> bool:
    """Apple's MPS has no float64; every other torch device does."""
    return device.type != 'mps'


def _decay_pair(decay, decay_tensor):
    """(d, 1 - d) as the kernels use them: 1 - d is formed in float64 before rounding, like the seed's Python.
    On a device without float64 (MPS) a decay tensor's 1 - d is formed in float32 (no compiled op runs there)."""
    if decay_tensor is None:
        return decay, 1.0 - decay
    d = decay_tensor.detach()
    d = d.to(torch.float64) if has_float64(d.device) else d.to(torch.float32)
    return d, 1.0 - d


def ema_update_(ema, model, decay, mode: str = 'yolov5', guard=None) -> None:
    """ema[i] = decay * ema[i] + (1 - decay) * model[i], in place; ``decay`` a float or a 0-d tensor.

    mode 'yolov5': ``v *= d; v += (1 - d) * m`` with each product and the sum rounded once (no FMA).
    mode 'lerp': ``torch.lerp(v, m, 1 - d)``. Per dtype pair, the kernels' rounding (see ``_Group``).
    ``guard``: see ``_ops.ema_update_``.
    """
    decay, decay_tensor = (0.0, decay) if isinstance(decay, torch.Tensor) else (decay, None)
    check_ema_args(ema, model, decay, decay_tensor, mode, guard)
    EmaGroups(ema, model).apply(list(ema), list(model), decay, decay_tensor, mode, guard)  # [exact ends] always


def nonfinite(tensors):
    """A 0-d bool tensor on the tensors' device: whether any of them holds a NaN or Inf.

    On the CPU, one sum per tensor first: a finite sum proves every element finite (a NaN or Inf makes the sum
    NaN or Inf), and only tensors with a nonfinite sum (finite values can also overflow it) get the exact test.
    Elsewhere, or traced, the exact test for all (min and max per tensor), with no host sync."""
    ts = [t for t in tensors if t.numel()]
    if not ts:
        return torch.zeros((), dtype=torch.bool, device=tensors[0].device if tensors else 'cpu')
    if ts[0].device.type == 'cpu' and not torch.compiler.is_compiling():
        sums = [t.sum(dtype=_opmath(t.dtype)) for t in ts]
        ok = [bool(torch.stack(g).isfinite().all()) for g in _by_dtype(sums).values()]
        if all(ok):
            return torch.zeros((), dtype=torch.bool)
        suspects = [t for t, s in zip(ts, sums) if not bool(s.isfinite())]
        return _exact_nonfinite(suspects)
    return _exact_nonfinite(ts)


def _by_dtype(tensors):
    groups = defaultdict(list)
    for t in tensors:
        groups[t.dtype].append(t)
    return groups


def _exact_nonfinite(ts):
    flags = [torch.stack([m for t in g for m in torch.aminmax(t)]).isfinite().all() for g in _by_dtype(ts).values()]
    return ~torch.stack(flags).all()


# Elements per chunk of the pure-torch EMA: the seed's formula needs (1 - d) * m as its own rounded temporary;
# made chunk by chunk into one reused scratch buffer, it stays in cache and allocates nothing per call.
# Tensors of at most SMALL elements (BN vectors, biases: most of a model's tensors, few of its bytes) are packed
# instead: two foreach copies into flat buffers, three ops over them, one foreach copy back. A per-tensor op
# costs a few microseconds on the CPU, and on small models that count is what the time is made of; mul and add
# round each element alike wherever it sits, so packing keeps the seed's bits (lerp is left per tensor).
# NOTE: the cached buffers and their views are the group's own; it keeps no tensor or view of the tensors it
# updates (a view references its base, which would block torch.utils.swap_tensors): those come in every call.
CHUNK = 1 << 20
SMALL = 1 << 12


def _pieces(e, m, limit):
    """(ema piece, model piece) views of at most ``limit`` elements (a single row may exceed it)."""
    if e.numel() == 0:
        return []
    if e.is_contiguous() and m.is_contiguous():
        return list(zip(e.view(-1).split(limit), m.view(-1).split(limit)))
    rows = max(1, limit // max(1, e[0].numel())) if e.dim() else 1
    if e.dim() == 0 or e.shape[0] <= rows:
        return [(e, m)]
    return list(zip(e.split(rows), m.split(rows)))


def _pick(idx, xs):
    return [xs[i] for i in idx]


class _Plan:
    """How one group walks its tensors in one mode: ``packed`` (indices, ema buffer, model buffer, views of them
    shaped like the tensors) or None, ``chunks`` [(indices, scratch views shaped like them)] for tensors up to
    CHUNK elements, ``big`` the indices of the larger ones (cut into pieces each call) and their scratch."""

    def __init__(self, es, ms, mode, op, device):
        shape_free = [i for i, e in enumerate(es) if 0 < e.numel() <= SMALL] if mode == 'yolov5' else []
        self.packed = None
        if len(shape_free) > 1:
            total = sum(es[i].numel() for i in shape_free)
            ebuf = torch.empty(total, dtype=op, device=device)
            mbuf = torch.empty(total, dtype=op, device=device)
            sizes = [es[i].numel() for i in shape_free]
            shape = [es[i].shape for i in shape_free]
            self.packed = (shape_free, ebuf, mbuf, [v.view(s) for v, s in zip(ebuf.split(sizes), shape)],
                           [v.view(s) for v, s in zip(mbuf.split(sizes), shape)])
            taken = set(shape_free)
        else:
            taken = set()
        rest = [i for i, e in enumerate(es) if i not in taken and e.numel()]
        self.big = [i for i in rest if es[i].numel() > CHUNK]
        whole = [i for i in rest if es[i].numel() <= CHUNK]
        # a piece of a strided tensor is whole rows, and a single row may exceed CHUNK
        room = max([CHUNK] + [p.numel() for i in self.big for p, _ in _pieces(es[i], ms[i], CHUNK)])
        self.scratch = torch.empty(room, dtype=op, device=device) if rest else None
        self.chunks, cur, used = [], [], 0
        for i in whole:
            n = es[i].numel()
            if used + n > CHUNK and cur:
                self.chunks.append(self._chunk(cur, es))
                cur, used = [], 0
            cur.append(i)
            used += n
        if cur:
            self.chunks.append(self._chunk(cur, es))

    def _chunk(self, idx, es):
        views, at = [], 0
        for i in idx:
            views.append(self.scratch[at:at + es[i].numel()].view(es[i].shape))
            at += es[i].numel()
        return idx, views


class _Group:
    """One (device, ema dtype, model dtype) group, cut into cache-sized chunks that share one scratch buffer."""

    def __init__(self, device, edt, mdt, es, ms):
        self.device, self.edt, self.mdt = device, edt, mdt
        self.op = _opmath(edt)
        self.shapes = [e.shape for e in es]  # what the plans are cut to (a plan proves them unchanged)
        self.plans = {}  # per mode, built at the first update that needs one
        self.seed_math = (edt, mdt) in _validate.SEED_ROUNDING_PAIRS

    def apply(self, es, ms, d, omd, mode):
        with torch.no_grad():
            self._apply(es, ms, d, omd, mode)

    def _apply(self, es, ms, d, omd, mode):
        if self.seed_math:
            return _seed_steps(es, ms, d, omd, mode)
        if isinstance(d, torch.Tensor):
            d, omd = d.to(device=self.device, dtype=self.op), omd.to(device=self.device, dtype=self.op)
        if self.edt != self.op:  # a half/bf16 EMA: math in fp32 copies, rounded once when written back
            work, wide = [e.to(self.op) for e in es], [m.to(self.op) for m in ms]
            _combine(work, wide, d, omd, mode)
            torch._foreach_copy_(es, work)
        elif mode == 'lerp' and self.mdt == self.op:
            _combine(es, ms, d, omd, mode)  # no temporary at all
        elif torch.compiler.is_compiling():  # compile traces plain tensor ops: no cached buffers
            _combine(es, [m.to(self.op) for m in ms], d, omd, mode)
        else:
            plan = self.plans.get(mode)
            if plan is None:
                with torch.inference_mode(False):  # buffers made inside inference_mode must work outside it
                    plan = self.plans[mode] = _Plan(es, ms, mode, self.op, self.device)
            if plan.packed is not None:
                idx, ebuf, mbuf, eviews, mviews = plan.packed
                pe = _pick(idx, es)
                torch._foreach_copy_(mviews, _pick(idx, ms))  # upcasts a half/bf16 model exactly
                torch._foreach_copy_(eviews, pe)
                _combine([ebuf], [mbuf], d, omd, mode, scratch_is_free=True)
                torch._foreach_copy_(pe, eviews)
            for idx, views in plan.chunks:
                torch._foreach_copy_(views, _pick(idx, ms))  # upcasts a half/bf16 model exactly
                _combine(_pick(idx, es), views, d, omd, mode, scratch_is_free=True)
            for i in plan.big:
                for pe, pm in _pieces(es[i], ms[i], CHUNK):
                    view = plan.scratch[:pm.numel()].view(pm.shape)
                    view.copy_(pm)
                    _combine([pe], [view], d, omd, mode, scratch_is_free=True)


class EmaGroups:
    """The pure-torch update of ema/model lists of one layout, grouped by (device, dtypes) for the foreach calls;
    a plan keeps one per device and hands it the lists each step (see the NOTE on cached buffers above)."""

    def __init__(self, ema, model):
        groups = defaultdict(list)
        for i, (e, m) in enumerate(zip(ema, model)):
            groups[(e.device, e.dtype, m.dtype)].append(i)
        self.groups = [(idx, _Group(device, edt, mdt, _pick(idx, ema), _pick(idx, model)))
                       for (device, edt, mdt), idx in groups.items()]

    def apply(self, ema, model, decay, decay_tensor, mode, guard=None, ends=True):
        """NOTE [exact ends]: a decay of exactly 1 writes nothing (and checks nothing: the guard reports no skip),
        one of exactly 0 copies the model (as ``copy_`` converts it), as the kernels do: the formula would turn an
        Inf into NaN (0 * inf) and -0.0 into +0.0 there. A decay only the device knows (a device tensor, or any
        tensor while traced) is selected for on the device, when ``ends`` says it may be 0 or 1."""
        d, omd = _decay_pair(decay, decay_tensor)
        # a decay tensor whose value was not checked on the host (on a device, or traced): [decay tensor]
        unread = decay_tensor is not None and (decay_tensor.device.type != 'cpu' or torch.compiler.is_compiling())
        value = None if unread else decay if decay_tensor is None else float(decay_tensor)  # a CPU read: no sync
        if value == 1.0:
            if guard is not None:
                guard[0] = 0
            return
        if guard is None and not unread:  # the seed's path: no context entered here (each group enters no_grad)
            self._write(ema, model, d, omd, mode, value)
            return
        with torch.no_grad():
            device = ema[0].device if ema else (guard if guard is not None else decay_tensor).device
            bad = nonfinite(model).to(device) if guard is not None else None
            if unread:
                invalid = ~decay_is_valid(decay_tensor).to(device)
                bad = invalid if bad is None else bad | invalid
            elif guard.device.type == 'cpu' and not torch.compiler.is_compiling():
                skip = bool(bad)  # a CPU read is no device sync
                guard[0] = int(skip)
                guard[1] += int(skip)
                if not skip:
                    self._write(ema, model, d, omd, mode, value)
                return
            self._on_device(ema, model, d, omd, mode, guard, bad, value, ends and unread, device)

    def _write(self, ema, model, d, omd, mode, value):
        if value == 0.0:
            with torch.no_grad():
                torch._foreach_copy_(ema, model)
        else:
            self._update(ema, model, d, omd, mode)

    def _on_device(self, ema, model, d, omd, mode, guard, bad, value, ends, device):
        """The update with no host sync: computed, then the old values kept where the step must not write (``bad``:
        the guard found a NaN/Inf or the decay is invalid; or the decay is 1) and the model's taken where the decay
        is 0. ``ends``: the decay is a device value that may be 0 or 1."""
        copy, hold = None, bad
        if ends:
            one, copy = (d == 1).to(device), (d == 0).to(device)
            bad = None if bad is None else bad & ~one  # a step that writes nothing skips nothing
            hold = one if bad is None else bad | one
        before = None if hold is None else [e.clone() for e in ema]
        self._write(ema, model, d, omd, mode, value)
        if copy is not None:
            for e, m in zip(ema, model):
                e.copy_(torch.where(copy, m, e))
        if before is not None:
            for e, b in zip(ema, before):
                e.copy_(torch.where(hold, b, e))
        if guard is not None:
            guard[0].copy_(bad)
            guard[1].add_(bad.long())

    def _update(self, ema, model, d, omd, mode):
        if len(self.groups) == 1:
            self.groups[0][1].apply(ema, model, d, omd, mode)
            return
        for idx, g in self.groups:
            g.apply(_pick(idx, ema), _pick(idx, model), d, omd, mode)


def _seed_steps(es, ms, d, omd, mode):
    """The SEED_ROUNDING_PAIRS (a half/bf16/fp64 EMA of an fp32 model, an fp32 EMA of an fp64 model, ...): the
    seed's own three steps, so each rounds where the seed rounds: ``v *= d`` in the EMA's dtype, ``(1 - d) * m``
    in the model's, the sum in the wider of the two, stored in the EMA's. Mode 'lerp' works in the wider dtype
    and rounds once into the EMA. Tensor by tensor: a foreach op rounds a Python scalar to a half tensor's dtype
    first, where the seed's ``v *= d`` multiplies by it in float32. A decay tensor is taken to each step's
    opmath first: on CUDA a float64 0-d tensor times a half tensor would be rounded to half."""
    if mode == 'yolov5':
        for e, m in zip(es, ms):
            if isinstance(d, torch.Tensor):
                e.copy_(e.to(_opmath(e.dtype)) * d.to(_opmath(e.dtype)))
                e.add_((m.to(_opmath(m.dtype)) * omd.to(_opmath(m.dtype))).to(m.dtype))
            else:
                e.mul_(d)
                e.add_(m * omd)
        return
    for e, m in zip(es, ms):
        wide = torch.promote_types(e.dtype, m.dtype)
        e.copy_(torch.lerp(e.to(wide), m.to(wide), omd))


def _combine(es, ms, d, omd, mode, scratch_is_free=False):
    """es = d * es + (1 - d) * ms in place, with the rounding steps of the chosen mode."""
    if mode == 'yolov5':
        # (1 - d) * m rounded alone, then d * e, then the sum: add_(alpha=) would fuse a multiply-add (FMA)
        tmp = ms if scratch_is_free else None
        if tmp is None:
            tmp = torch._foreach_mul(ms, omd)
        else:
            torch._foreach_mul_(tmp, omd)
        torch._foreach_mul_(es, d)
        torch._foreach_add_(es, tmp)
    else:
        torch._foreach_lerp_(es, ms, omd if not isinstance(omd, torch.Tensor) else [omd] * len(ms))


# Zero counting on the CPU: `logical_not(t)` (true exactly where t == 0: -0.0 included, NaN not) into a reused
# cache-sized bool buffer, summed as bytes. On the CPU it runs faster than `t == 0`, and count_nonzero is
# data-dependent (fast on dense weights, several times slower with scattered zeros, i.e. after pruning). The
# reused buffer avoids a model-sized temporary. Small tensors of one dtype are first packed into one buffer, so
# that they cost one pass instead of one each.
ZERO_CHUNK = 1 << 18
_ZERO_SCRATCH = threading.local()  # per thread: concurrent calls must not share the buffers


def _scratch(name, dtype):
    bufs = getattr(_ZERO_SCRATCH, 'bufs', None)
    if bufs is None:
        bufs = _ZERO_SCRATCH.bufs = {}
    buf = bufs.get((name, dtype))
    if buf is None:
        buf = bufs[(name, dtype)] = torch.empty(ZERO_CHUNK, dtype=dtype)
    return buf


# dtypes without a CPU logical_not kernel (unsigned wider than a byte, float8): counted with `t == 0`
_EQ_ONLY = {getattr(torch, n) for n in ('uint16', 'uint32', 'uint64', 'float8_e4m3fn', 'float8_e5m2',
                                         'float8_e4m3fnuz', 'float8_e5m2fnuz') if hasattr(torch, n)}


def _cpu_zero_counts(tensors):
    flags = _scratch('flags', torch.bool)
    counts, small = [], defaultdict(list)
    for t in tensors:
        if t.dtype in _EQ_ONLY:
            counts.append((t == 0).sum())
        elif t.numel() > ZERO_CHUNK // 4:
            for piece in t.reshape(-1).split(ZERO_CHUNK):  # a copy only for a non-contiguous tensor
                counts.append(_zeros_in(piece, flags))
        else:
            small[t.dtype].append(t.reshape(-1))
    for dtype, flat in small.items():
        while flat:  # pack up to ZERO_CHUNK elements at a time
            take, n = [], 0
            while flat and (not take or n + flat[-1].numel() <= ZERO_CHUNK):
                n += flat[-1].numel()
                take.append(flat.pop())
            if len(take) == 1:
                counts.append(_zeros_in(take[0], flags))
                continue
            packed = _scratch('pack', dtype)[:n]
            torch.cat(take, out=packed)
            counts.append(_zeros_in(packed, flags))
    return counts


def _zeros_in(flat, flags):
    out = flags[:flat.numel()]
    torch.logical_not(flat, out=out)
    return out.view(torch.uint8).sum(dtype=torch.int32)  # at most ZERO_CHUNK per piece


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
    if device.type == 'cpu' and not torch.compiler.is_compiling():
        with torch.no_grad():  # the packing copies are not part of any graph
            counts = _cpu_zero_counts(tensors)
    else:  # one comparison and one reduction a tensor, no host sync
        counts = [(t == 0).sum() for t in tensors]
    return torch.stack(counts).sum(dtype=torch.int64)


def _correct_sqrt(x, op):
    """sqrt of ``x`` (dtype ``op``) rounded as the kernels round it: through float64, which a float32 input fits
    exactly. A device without float64 (MPS) takes its own float32 sqrt: no compiled op runs there, and the
    result may differ from the kernels' in the last bit of a scale."""
    if has_float64(x.device):
        return x.double().sqrt().to(op)
    return x.sqrt()


def _cat_or_fill(vectors, counts, fill, like):
    return torch.cat([v.to(like.dtype) if v is not None else torch.full((c,), fill, dtype=like.dtype,
                                                                        device=like.device)
                      for v, c in zip(vectors, counts)])


def bn_scale_shift(bn_weight, bn_bias, mean, var, eps, bias, opmath):
    """Per-output-channel (scale, new bias) of folding BN into the preceding layer, in opmath."""
    scale, shift = scale_shift_all([bn_weight], [bn_bias], [mean], [var], [eps], [bias], opmath)
    return scale[0], shift[0]


def scale_shift_all(bn_weight, bn_bias, mean, var, eps, bias, opmath):
    """(scales, new biases) for many layers on one device in one dtype: each step is one op over every channel
    of every layer. The operation order is the kernels': bn_weight / sqrt(var + eps), then (bias - mean) * scale
    (+ bn_bias), each rounded once."""
    counts = [v.numel() for v in var]
    v = torch.cat([x.to(opmath) for x in var])
    eps = [float(x) for x in eps]
    if len(set(eps)) == 1:  # the usual case: eps rounded to opmath as a scalar operand, as the kernels round it
        v = v + eps[0]
    else:  # built on the device, no host-to-device copy
        v = v + torch.cat([torch.full((c,), e, dtype=opmath, device=v.device) for c, e in zip(counts, eps)])
    std = _correct_sqrt(v, opmath)
    scale = _cat_or_fill(bn_weight, counts, 1.0, v) / std
    shift = (_cat_or_fill(bias, counts, 0.0, v) - torch.cat([x.to(opmath) for x in mean])) * scale
    if any(b is not None for b in bn_bias):
        shift = shift + _cat_or_fill(bn_bias, counts, 0.0, v)
    return scale.split(counts), shift.split(counts)


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
    groups = defaultdict(list)  # layers sharing a device and a math dtype: their channel vectors in one go
    for i, w in enumerate(weight):
        groups[(w.device, _opmath(w.dtype))].append(i)
    out_w, out_b = [None] * len(weight), [None] * len(weight)
    for (_, op), idx in groups.items():
        pick = lambda xs: [xs[i] for i in idx]  # noqa: E731
        scales, shifts = scale_shift_all(pick(bn_weight), pick(bn_bias), pick(mean), pick(var), pick(eps),
                                         pick(bias), op)
        for i, scale, shift in zip(idx, scales, shifts):
            w = weight[i]
            f = channel_factor(scale, w, transposed_groups[i])
            if w.dtype == op:  # one rounding either way; in place needs no temporary
                out_w[i] = w.mul_(f) if inplace else w * f
            else:
                out_w[i] = w.copy_(w.to(op) * f) if inplace else (w.to(op) * f).to(w.dtype)
            out_b[i] = shift.to(w.dtype, copy=True)  # its own storage, not a view of the shared vector
    return out_w, out_b
