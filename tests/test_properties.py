"""Property tests (hypothesis): the compiled ops against their pure-torch twins and a float64 oracle, over
random shapes, dtypes, memory layouts (contiguous, permuted, strided, channels_last) and decays.

Without the compiled ops (a pure-torch install) the twin is still checked against the float64 oracle.
"""
import os

import pytest
import torch

if os.environ.get('TORCHUTILS_EXT_REQUIRE_EXT') == '1':  # CI's strict mode: what CI installs must be there
    import hypothesis  # noqa: F401
else:
    hypothesis = pytest.importorskip('hypothesis')  # a dev dependency; scripts/_install.sh installs it
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from conftest import same_layout_clone as _same_layout_clone  # noqa: E402
from fold_cases import check_fold_case  # noqa: E402

import torchutils_ext as tx  # noqa: E402
from torchutils_ext import _ops  # noqa: E402
from torchutils_ext._validate import SEED_ROUNDING_PAIRS  # noqa: E402

F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
EMA_KINDS = [(e, m) for e in (F32, F16, BF16, F64) for m in (F32, F16, BF16, F64)]
# one rounding of the fp32 (fp64) result to the EMA dtype, plus the fp32 math: relative error bound (the
# seed-rounding pairs also round (1 - d) * m to the model's dtype: the looser of the two dtypes' bounds)
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
        rtol = max(EMA_RTOL[e.dtype], EMA_RTOL[m.dtype]) if (e.dtype, m.dtype) in SEED_ROUNDING_PAIRS else \
            EMA_RTOL[e.dtype]
        tol = rtol * (ref.abs() + e.to(F64).abs() + m.to(F64).abs()) + 1e-30
        assert ((t.to(F64) - ref).abs() <= tol).all(), (e.dtype, m.dtype, mode, decay)
        assert t.stride() == e.stride()  # written in place, layout kept
    if not _ops.COMPILED:
        return
    ext = _run_ema('ext', ema, model, decay, mode, decay_dtype)
    for e, m, t, x in zip(ema, model, twin, ext):
        assert torch.equal(t, x), f'compiled and pure-torch {mode} updates must agree bit for bit'


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


@SETTINGS
@given(fold_cases(), st.booleans())
def test_fold_compiled_equals_twin_and_float64(case, inplace):
    check_fold_case(case, inplace)
