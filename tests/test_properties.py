"""Property tests (hypothesis): the compiled ops against their pure-torch twins and a float64 oracle, over
random shapes, dtypes, memory layouts (contiguous, permuted, strided, channels_last) and decays.

Without the compiled ops (a pure-torch install) the twin is still checked against the float64 oracle.
"""
import pytest
import torch
import torch.nn as nn

hypothesis = pytest.importorskip('hypothesis')  # a dev dependency; CI installs it (scripts/_install.sh)
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import torchutils_ext as tx  # noqa: E402
from torchutils_ext import _ops  # noqa: E402

F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
EMA_KINDS = [(F32, F32), (F32, F16), (F32, BF16), (F16, F16), (BF16, BF16), (F64, F64)]
# one rounding of the fp32 (fp64) result to the EMA dtype, plus the fp32 math: relative error bound
EMA_RTOL = {F32: 4e-7, F16: 2 ** -10, BF16: 2 ** -7, F64: 1e-15}
SETTINGS = settings(max_examples=60, deadline=None, derandomize=True)


def layout_tensor(shape, dtype, layout, gen):
    """A tensor of logical `shape` and `dtype` whose memory is laid out as `layout`."""
    if layout == 'permuted' and len(shape) >= 2:  # dense, not contiguous
        t = torch.randn(*shape[:-2], shape[-1], shape[-2], generator=gen).to(dtype)
        return t.transpose(-1, -2)
    if layout == 'strided' and len(shape) >= 1:  # every other element of a wider buffer: not dense
        t = torch.randn(*shape[:-1], 2 * shape[-1], generator=gen).to(dtype)
        return t[..., ::2]
    if layout == 'channels_last' and len(shape) == 4:
        return torch.randn(shape, generator=gen).to(dtype).contiguous(memory_format=torch.channels_last)
    return torch.randn(shape, generator=gen).to(dtype)


LAYOUTS = st.sampled_from(['contiguous', 'permuted', 'strided', 'channels_last'])


@st.composite
def ema_cases(draw):
    pairs = []
    for _ in range(draw(st.integers(1, 5))):
        shape = tuple(draw(st.lists(st.integers(1, 7), min_size=0, max_size=4)))
        edt, mdt = draw(st.sampled_from(EMA_KINDS))
        pairs.append((shape, edt, mdt, draw(LAYOUTS), draw(LAYOUTS)))
    decay = draw(st.one_of(st.sampled_from([0.0, 1.0, 0.5, 0.9999]), st.floats(0.0, 1.0)))
    return pairs, decay, draw(st.sampled_from(['yolov5', 'lerp'])), draw(st.sampled_from([None, F32, F64])), \
        draw(st.integers(0, 2 ** 31 - 1))


def _ema_inputs(pairs, seed):
    gen = torch.Generator().manual_seed(seed)
    ema = [layout_tensor(s, e, le, gen) for s, e, _, le, _ in pairs]
    model = [layout_tensor(s, m, lm, gen) for s, _, m, _, lm in pairs]
    return ema, model


def _run_ema(backend, ema, model, decay, mode, decay_dtype):
    out = [_same_layout_clone(e) for e in ema]
    d = decay if decay_dtype is None else torch.tensor(decay, dtype=decay_dtype)
    with tx.use_backend(backend):
        _ops.ema_update_(out, model, d, mode=mode)
    return out


def _same_layout_clone(t):
    """A copy with the same strides (a plain clone() of a strided view is compacted)."""
    base = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype)
    return base.copy_(t)


@SETTINGS
@given(ema_cases())
def test_ema_compiled_equals_twin_and_float64(case):
    pairs, decay, mode, decay_dtype, seed = case
    ema, model = _ema_inputs(pairs, seed)
    if decay_dtype is not None:
        decay = torch.tensor(decay, dtype=decay_dtype).item()  # the decay the ops really see
    twin = _run_ema('torch', ema, model, decay, mode, decay_dtype)
    for e, m, t in zip(ema, model, twin):
        op = F64 if e.dtype == F64 else F32
        ref = e.to(F64) * decay + (1 - decay) * m.to(op).to(F64)
        tol = EMA_RTOL[e.dtype] * (ref.abs() + e.to(F64).abs() + m.to(F64).abs()) + 1e-30
        assert ((t.to(F64) - ref).abs() <= tol).all(), (e.dtype, m.dtype, mode, decay)
        assert t.stride() == e.stride()  # written in place, layout kept
    if not _ops.COMPILED:
        return
    ext = _run_ema('ext', ema, model, decay, mode, decay_dtype)
    for e, m, t, x in zip(ema, model, twin, ext):
        if mode == 'yolov5':
            assert torch.equal(t, x), 'compiled and pure-torch yolov5 updates must agree bit for bit'
        else:  # torch's vectorised lerp may fuse a multiply-add: an ulp of the inputs' magnitude
            scale = e.to(F64).abs() + m.to(F64).abs()
            assert ((x.to(F64) - t.to(F64)).abs() <= EMA_RTOL[e.dtype] * scale).all()


CONVS = {
    1: (nn.Conv1d, nn.ConvTranspose1d, nn.BatchNorm1d),
    2: (nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d),
    3: (nn.Conv3d, nn.ConvTranspose3d, nn.BatchNorm3d),
}


@st.composite
def fold_cases(draw):
    nd = draw(st.integers(0, 3))  # 0: Linear
    transposed = nd > 0 and draw(st.booleans())
    groups = 1 if nd == 0 else draw(st.sampled_from([1, 2, 3]))
    cin, cout = groups * draw(st.integers(1, 4)), groups * draw(st.integers(1, 4))
    kernel = draw(st.integers(1, 3))
    dtype = draw(st.sampled_from([F32, F64, F16, BF16]))
    layout = draw(st.sampled_from(['contiguous', 'channels_last', 'strided']))
    return (nd, transposed, groups, cin, cout, kernel, draw(st.booleans()), draw(st.booleans()), dtype, layout,
            draw(st.integers(0, 2 ** 31 - 1)))


def _fold_inputs(case):
    nd, transposed, groups, cin, cout, kernel, bias, affine, dtype, layout, seed = case
    torch.manual_seed(seed)
    if nd == 0:
        layer, bn = nn.Linear(cin, cout, bias=bias), nn.BatchNorm1d(cout, affine=affine)
    else:
        conv, convt, bn_cls = CONVS[nd]
        cls = convt if transposed else conv
        layer, bn = cls(cin, cout, kernel, groups=groups, bias=bias), bn_cls(cout, affine=affine)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.2, 2.0)
        if affine:
            bn.weight.normal_()
            bn.bias.normal_()
    w = layer.weight.detach().to(dtype)
    if layout == 'channels_last' and w.dim() == 4:
        w = w.contiguous(memory_format=torch.channels_last)
    elif layout == 'strided':
        w = _same_layout_clone_strided(w)
    vec = lambda t: None if t is None else t.detach().to(dtype)  # noqa: E731
    args = ([w], [vec(layer.bias)], [vec(bn.weight)], [vec(bn.bias)], [vec(bn.running_mean)],
            [vec(bn.running_var)], [bn.eps], [groups if transposed else 0])
    return args, transposed, groups


def _same_layout_clone_strided(w):
    """w's values in a non-dense view (every other element of the last dim of a wider buffer)."""
    wide = torch.zeros(*w.shape[:-1], 2 * w.shape[-1], dtype=w.dtype)
    view = wide[..., ::2]
    view.copy_(w)
    return view


def _f64_fold(args, transposed, groups):
    (w,), (b,), (bw,), (bb,), (mean,), (var,), (eps,), _ = args
    scale = (1.0 if bw is None else bw.double()) / torch.sqrt(var.double() + eps)
    scale = scale.expand(var.shape)
    shift = ((0.0 if b is None else b.double()) - mean.double()) * scale + (0.0 if bb is None else bb.double())
    if transposed:
        cin, opg = w.shape[0], w.shape[1]
        f = scale.view(groups, 1, opg).expand(groups, cin // groups, opg).reshape(cin, opg)
        f = f.view(cin, opg, *([1] * (w.dim() - 2)))
    else:
        f = scale.view(-1, *([1] * (w.dim() - 1)))
    return w.double() * f, shift


FOLD_RTOL = {F32: 1e-6, F64: 1e-14, F16: 2 ** -10, BF16: 2 ** -7}


@SETTINGS
@given(fold_cases(), st.booleans())
def test_fold_compiled_equals_twin_and_float64(case, inplace):
    args, transposed, groups = _fold_inputs(case)
    dtype = args[0][0].dtype
    ref_w, ref_b = _f64_fold(args, transposed, groups)
    results = {}
    for backend in ('torch', 'ext') if _ops.COMPILED else ('torch',):
        w_in = [_same_layout_clone(args[0][0])]
        before = w_in[0].clone()
        with tx.use_backend(backend):
            (w,), (b,) = _ops.fold_conv_bn(w_in, *args[1:], inplace=inplace)
        if inplace:
            assert w is w_in[0]
        else:
            assert torch.equal(w_in[0], before), 'the functional fold must not write its input'
        assert w.dtype == dtype and b.dtype == dtype and b.shape == ref_b.shape
        torch.testing.assert_close(w.double(), ref_w, rtol=FOLD_RTOL[dtype], atol=FOLD_RTOL[dtype] * 1e-3)
        torch.testing.assert_close(b.double(), ref_b, rtol=FOLD_RTOL[dtype], atol=FOLD_RTOL[dtype])
        results[backend] = (w, b)
    if 'ext' in results:
        assert torch.equal(results['ext'][0], results['torch'][0])
        assert torch.equal(results['ext'][1], results['torch'][1])
