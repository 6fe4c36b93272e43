"""ema_update_: seed bit-parity, mixed dtypes vs float64, lerp, strides, tensor decay, opcheck, bad input."""
import math

import pytest
import torch
import torch.nn as nn
from conftest import assert_untouched, snapshot
from torch.utils._python_dispatch import TorchDispatchMode

import torchutils_ext as tx
from torchutils_ext import _ema_plan, _ops, _torch_ops

LOW = [torch.float16, torch.bfloat16]


def seed_step(v, m, d):
    """The seed's update, verbatim in spirit: v *= d; v += (1 - d) * m (fp32 tensors, Python float d)."""
    v *= d
    v += (1 - d) * m


def make(shapes, dtype=torch.float32, seed=0, device='cpu'):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(device=device, dtype=dtype) for s in shapes]


SHAPES = [(3,), (17, 5), (64, 32, 3, 3), (1,), (1000,), (2, 3, 4, 5), (70001,)]


@pytest.mark.parametrize('decay', [0.0, 0.5, 0.9999, 1.0, 0.123456789])
def test_yolov5_mode_is_bit_identical_to_seed(backend, device, decay):
    ema, model = make(SHAPES, seed=1, device=device), make(SHAPES, seed=2, device=device)
    ref = snapshot(ema)
    for v, m in zip(ref, model):
        seed_step(v, m, decay)
    _ops.ema_update_(ema, model, decay)
    for r, e in zip(ref, ema):
        assert torch.equal(r, e)


def test_many_steps_stay_bit_identical(backend, device):
    ema, model = make(SHAPES[:4], seed=3, device=device), make(SHAPES[:4], seed=4, device=device)
    ref = snapshot(ema)
    for step in range(1, 30):
        d = 0.9999 * (1 - math.exp(-step / 2000))
        for m in model:
            m.add_(0.01)
        for v, m in zip(ref, model):
            seed_step(v, m, d)
        _ops.ema_update_(ema, model, d)
    assert all(torch.equal(r, e) for r, e in zip(ref, ema))


@pytest.mark.parametrize('edt,mdt', [(torch.float32, torch.float16), (torch.float32, torch.bfloat16),
                                     (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
                                     (torch.float64, torch.float64)])
@pytest.mark.parametrize('mode', ['yolov5', 'lerp'])
def test_mixed_dtypes_against_float64(backend, device, edt, mdt, mode):
    ema, model = make(SHAPES, edt, 5, device), make(SHAPES, mdt, 6, device)
    d = 0.75
    ref = [e.double() * d + (1 - d) * m.double() for e, m in zip(ema, model)]
    _ops.ema_update_(ema, model, d, mode=mode)
    # math in fp32 (fp64 for fp64) then one rounding to the EMA dtype
    tol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float64: 1e-14}[edt]
    for r, e in zip(ref, ema):
        assert e.dtype == edt
        torch.testing.assert_close(e.double(), r, rtol=tol, atol=tol)


def test_both_backends_agree_bitwise_on_mixed_dtypes(device):
    if not (_ops.COMPILED and _ops._has_kernel('ema_update_', device.type)):
        pytest.skip('compiled ops not built')
    for edt, mdt in [(torch.float32, torch.bfloat16), (torch.float16, torch.float16), (torch.float32, torch.float16)]:
        a, model = make(SHAPES, edt, 7, device), make(SHAPES, mdt, 8, device)
        b = snapshot(a)
        torch.ops.torchutils_ext.ema_update_(a, model, 0.9, 'yolov5')
        _torch_ops.ema_update_(b, model, 0.9, 'yolov5')
        assert all(torch.equal(x, y) for x, y in zip(a, b)), (edt, mdt)


@pytest.mark.parametrize('dtype', [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_lerp_mode_is_torch_lerp_bit_for_bit(backend, device, dtype):
    """Mode 'lerp' is torch.lerp(v, m, 1 - d) in every bit, and so the `torch._foreach_lerp_` that Ultralytics'
    EMA calls: one fused multiply-add on either side of w = 0.5, half/bf16 through float, vector bodies and
    tails, a strided pair too. (On CUDA this asserts that torch's lerp kernel is contracted to an FMA, as nvcc
    does by default; it passed on an H200, torch 2.11.)"""
    shapes = SHAPES + [(9, 13)]
    for d in (0.3, 0.5, 0.7, 0.9999, 0.0005, 0.123456789):  # w = 1 - d on both sides of 0.5, and 0.5 itself
        ema, model = make(shapes, dtype, seed=9, device=device), make(shapes, dtype, seed=10, device=device)
        ema[-1], model[-1] = ema[-1].t(), model[-1].t()  # non-contiguous
        ref = [torch.lerp(e, m, 1 - d) for e, m in zip(ema, model)]
        fe = snapshot(ema)
        torch._foreach_lerp_(fe, model, 1 - d)
        _ops.ema_update_(ema, model, d, mode='lerp')
        for r, f, e in zip(ref, fe, ema):
            assert torch.equal(e, r) and torch.equal(e, f), (dtype, d)


def test_non_contiguous_and_channels_last(backend, device):
    base_e, base_m = torch.randn(8, 6, 5, 4, device=device), torch.randn(8, 6, 5, 4, device=device)
    cases = [
        (base_e.clone()[:, ::2], base_m.clone()[:, ::2]),  # strided views
        (base_e.clone().transpose(0, 1), base_m.clone().transpose(0, 1)),  # permuted, dense
        (base_e.clone().contiguous(memory_format=torch.channels_last),
         base_m.clone().contiguous(memory_format=torch.channels_last)),
        (base_e.clone().contiguous(memory_format=torch.channels_last), base_m.clone()),  # layouts differ
    ]
    for e, m in cases:
        ref = e.clone()
        seed_step(ref, m, 0.6)
        _ops.ema_update_([e], [m], 0.6)
        assert torch.equal(e, ref)


def test_decay_as_tensor_matches_float(backend, device):
    ema, model = make(SHAPES, seed=11, device=device), make(SHAPES, seed=12, device=device)
    ema2 = snapshot(ema)
    for dt, on in ((torch.float32, device), (torch.float64, device), (torch.float64, 'cpu')):
        d = torch.tensor(0.8125, dtype=dt, device=on)
        _ops.ema_update_(ema, model, d)
        _ops.ema_update_(ema2, model, 0.8125)
        assert all(torch.equal(a, b) for a, b in zip(ema, ema2))


class _Recorder(TorchDispatchMode):
    """Every op the dispatcher runs under it, by name."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_decay_tensor_reaches_the_tensor_overload_without_a_host_read(device):
    """Called through the packet, a decay tensor must reach .Tensor as it is: not converted to a float by .item()
    for .Scalar (a host sync, and on CUDA an invalidated graph capture). A float still takes .Scalar."""
    if not (_ops.COMPILED and _ops._has_kernel('ema_update_', device.type)):
        pytest.skip('compiled ops not built')
    e, m = make([(5,), (4, 3)], seed=25, device=device), make([(5,), (4, 3)], seed=26, device=device)
    ref = snapshot(e)
    for dt in (torch.float32, torch.float64):
        decay = torch.tensor(0.75, dtype=dt, device=device)
        with _Recorder() as rec:
            torch.ops.torchutils_ext.ema_update_(e, m, decay)
            torch.ops.torchutils_ext.ema_update_(e, m, decay, 'yolov5', None)
        assert rec.ops == ['torchutils_ext.ema_update_.Tensor'] * 2, rec.ops
    with _Recorder() as rec:
        torch.ops.torchutils_ext.ema_update_(e, m, 0.75)
    assert rec.ops == ['torchutils_ext.ema_update_.Scalar'], rec.ops
    for v, x in zip(ref, m):
        for _ in range(5):
            seed_step(v, x, 0.75)
    assert all(torch.equal(a, b) for a, b in zip(ref, e))


def test_decay_tensor_sharing_memory_is_refused(backend, device):
    """[decay tensor]: a decay that is an element of an EMA or model tensor or of the guard would be read while the
    kernels write: refused before anything is written, through the op and through ModelEMA's plan."""
    e, m = make([(5,), (4, 3)], seed=27, device=device), make([(5,), (4, 3)], seed=28, device=device)
    guard = torch.zeros(2, dtype=torch.int64, device=device)
    e[1][2, 1], e[0][4], m[1][0, 0] = 0.5, 0.25, 0.75  # valid values: the memory alone is wrong
    before_e, before_m = snapshot(e), snapshot(m)
    for decay, g in ((e[1][2, 1], None), (e[0][4:5].view(()), None), (m[1].t()[0, 0], None),
                     (guard.view(torch.float64)[1], guard)):
        with pytest.raises(ValueError, match='shares memory'):
            _ops.ema_update_(e, m, decay, guard=g)
    assert_untouched(before_e, e)
    assert_untouched(before_m, m)
    assert guard.tolist() == [0, 0]
    _ops.ema_update_(e, m, e[1][2, 1].clone())  # a copy owns its memory


@pytest.mark.parametrize('value', [float('nan'), float('inf'), -0.25, 1.0 + 2 ** -20])
def test_decay_tensor_out_of_range(backend, device, value):
    """[decay tensor]: a CPU decay tensor's value is checked like a float (ValueError, nothing written). A device
    decay's cannot be without a sync: the update writes nothing, and the guard counts the step as skipped."""
    e, m = make(SHAPES, seed=29, device=device), make(SHAPES, seed=30, device=device)
    before = snapshot(e)
    guard = torch.zeros(2, dtype=torch.int64, device=device)
    for dt in (torch.float32, torch.float64):
        on_cpu = torch.tensor(value, dtype=dt)
        with pytest.raises(ValueError, match=r'decay must be a finite number in \[0, 1\]'):
            _ops.ema_update_(e, m, on_cpu, guard=guard)
        assert_untouched(before, e)
        if device.type == 'cpu':
            continue
        on_device = on_cpu.to(device)
        _ops.ema_update_(e, m, on_device)
        _ops.ema_update_(e, m, on_device, mode='lerp', guard=guard)
        assert_untouched(before, e)
    assert guard.tolist() == ([0, 0] if device.type == 'cpu' else [1, 2])
    _ops.ema_update_(e, m, torch.tensor(0.5, device=device), guard=guard)  # a valid one: updates, clears the flag
    assert guard[0].item() == 0 and not any(torch.equal(a, b) for a, b in zip(before, e))


def test_unread_decay_tensor_on_the_pure_torch_path(monkeypatch):
    """The pure-torch form for a decay whose value is not read on the host (a device tensor, or traced by
    torch.compile), run eagerly on the CPU: an invalid value writes nothing (and the guard counts it), a valid one
    writes the twin's bits."""
    e, m = make([(50,), (3, 3)], seed=31), make([(50,), (3, 3)], seed=32)
    ref = snapshot(e)
    _torch_ops.ema_update_(ref, m, 0.75)
    monkeypatch.setattr(torch.compiler, 'is_compiling', lambda: True)
    guard = torch.zeros(2, dtype=torch.int64)
    for bad in (float('nan'), 2.0, -1.0):
        before = snapshot(e)
        _torch_ops.EmaGroups(e, m).apply(e, m, 0.0, torch.tensor(bad, dtype=torch.float64), 'yolov5')
        _torch_ops.EmaGroups(e, m).apply(e, m, 0.0, torch.tensor(bad), 'lerp', guard)
        assert_untouched(before, e)
    assert guard.tolist() == [1, 3]
    _torch_ops.EmaGroups(e, m).apply(e, m, 0.0, torch.tensor(0.75, dtype=torch.float64), 'yolov5', guard)
    assert all(torch.equal(a, b) for a, b in zip(e, ref)) and guard.tolist() == [0, 3]


def test_empty_list_and_empty_tensor(backend, device):
    _ops.ema_update_([], [], 0.5)
    e, m = torch.empty(0, 3, device=device), torch.empty(0, 3, device=device)
    _ops.ema_update_([e], [m], 0.5)
    assert e.shape == (0, 3)


BAD = [
    ('lengths', lambda e, m: ([e[0]], m), {}, ValueError),
    ('shape', lambda e, m: (e, [m[0], m[1].reshape(-1)]), {}, ValueError),
    ('int dtype', lambda e, m: ([e[0], e[1].long()], m), {}, TypeError),
    ('bool dtype', lambda e, m: (e, [m[0], m[1].bool()]), {}, TypeError),
    ('complex', lambda e, m: ([e[0], torch.zeros(4, 3, dtype=torch.complex64)], m), {}, TypeError),
    ('int model under a float ema', lambda e, m: (e, [m[0], m[1].int()]), {}, TypeError),
    ('aliased', lambda e, m: (e, [m[0], e[1]]), {}, ValueError),
    ('overlapping ema', lambda e, m: ([e[1][0], e[1][0]], [m[1][0], m[1][1]]), {}, ValueError),
    ('not a list', lambda e, m: (e[0], m[0]), {}, TypeError),
    ('meta mix', lambda e, m: (e, [m[0], m[1].to('meta')]), {}, ValueError),
    ('None entry', lambda e, m: ([e[0], None], m), {}, TypeError),
    ('numpy entry', lambda e, m: (e, [m[0], m[1].cpu().numpy()]), {}, TypeError),
    ('ema is a view of model', lambda e, m: ([e[0], m[1][:2]], [m[0], m[1][1:]]), {}, ValueError),
    ('ema partly overlaps model', lambda e, m: ([e[0], m[1].view(-1)[3:9]], [m[0], m[1].view(-1)[:6]]), {},
     ValueError),
    ('empty ema, full model', lambda e, m: ([], m), {}, ValueError),
    ('0-d vs 1-element', lambda e, m: ([e[0], e[1][0, 0]], [m[0], m[1][0, :1]]), {}, ValueError),
]


@pytest.mark.parametrize('name,mutate,kw,exc', BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises_and_leaves_tensors_untouched(backend, device, name, mutate, kw, exc):
    e, m = make([(5,), (4, 3)], seed=13, device=device), make([(5,), (4, 3)], seed=14, device=device)
    before_e, before_m = snapshot(e), snapshot(m)
    ea, ma = mutate(e, m)
    with pytest.raises(exc):
        _ops.ema_update_(ea, ma, 0.5)
    assert_untouched(before_e, e)
    assert_untouched(before_m, m)


@pytest.mark.parametrize('decay,exc', [(-0.1, ValueError), (1.5, ValueError), (float('nan'), ValueError),
                                       (float('inf'), ValueError), ('0.5', TypeError)])
def test_bad_decay_and_mode(backend, device, decay, exc):
    e, m = make([(5,)], seed=15, device=device), make([(5,)], seed=16, device=device)
    before = snapshot(e)
    with pytest.raises(exc):
        _ops.ema_update_(e, m, decay)
    with pytest.raises(ValueError, match='mode'):
        _ops.ema_update_(e, m, 0.5, mode='ema')
    with pytest.raises(TypeError):
        _ops.ema_update_(e, m, torch.tensor([0.5, 0.5], device=device))
    with pytest.raises(TypeError):
        _ops.ema_update_(e, m, torch.tensor(1, device=device))  # an integer decay tensor
    with pytest.raises(TypeError):
        _ops.ema_update_(e, m, None)
    assert_untouched(before, e)


def test_opcheck(device):
    if not (_ops.COMPILED and _ops._has_kernel('ema_update_', device.type)):
        pytest.skip('compiled ops not built')
    op = torch.ops.torchutils_ext.ema_update_
    e, m = make([(5,), (4, 3)], seed=17, device=device), make([(5,), (4, 3)], seed=18, device=device)
    guard = lambda: torch.zeros(2, dtype=torch.int64, device=device)  # noqa: E731
    torch.library.opcheck(op.Scalar, (e, m, 0.9, 'yolov5'))
    torch.library.opcheck(op.Scalar, (e, [x.bfloat16() for x in m], 0.5, 'lerp'))
    torch.library.opcheck(op.Scalar, ([x.half() for x in e], [x.double() for x in m], 0.5, 'yolov5'))
    torch.library.opcheck(op.Tensor, (e, m, torch.tensor(0.7, device=device), 'yolov5'))
    torch.library.opcheck(op.Tensor, (e, m, torch.tensor(0.7, dtype=torch.float64, device=device), 'lerp'))
    torch.library.opcheck(op.Tensor, (e, m, torch.tensor(0.7, dtype=torch.float64), 'lerp'))  # a CPU decay
    torch.library.opcheck(op.Scalar, (e, m, 0.9, 'yolov5', guard()))
    bad = [m[0], m[1].clone().fill_(float('nan'))]
    torch.library.opcheck(op.Tensor, (e, bad, torch.tensor(0.7, device=device), 'yolov5', guard()))


def test_fullgraph_compile_has_no_graph_break(device):
    if not (_ops.COMPILED and _ops._has_kernel('ema_update_', device.type)):
        pytest.skip('compiled ops not built')
    e, m = make([(5,), (4, 3)], seed=19, device=device), make([(5,), (4, 3)], seed=20, device=device)
    ref = snapshot(e)
    for v, x in zip(ref, m):
        seed_step(v, x, 0.9)

    @torch.compile(fullgraph=True, backend='eager')
    def step(ema, model):
        torch.ops.torchutils_ext.ema_update_(ema, model, 0.9, 'yolov5')

    step(e, m)
    assert all(torch.equal(a, b) for a, b in zip(ref, e))


def _holder(tensors):
    """A module whose state is these tensors (parameters that need no grad), for ModelEMA and its plan."""
    return nn.ParameterList([nn.Parameter(t, requires_grad=False) for t in tensors])


def test_plan_matches_the_op_and_follows_swapped_tensors(backend, device):
    """ModelEMA's plan (one C++ call per step on the compiled backend, the validated pure-torch update on the
    other): same bits as the stateless op; a tensor swapped under it (.data =) makes it stale and the rebuilt
    plan follows; an unfit swap, a bad decay or a decay tensor inside the EMA raises before anything is written."""
    model = _holder(make(SHAPES, seed=22, device=device))
    ema = tx.ModelEMA(model, tau=3)
    ema.ema.load_state_dict(_holder(make(SHAPES, seed=21, device=device)).state_dict())
    ref = snapshot(ema.ema.parameters())
    v0 = ema.ema[0]._version
    for step in range(3):
        ema.update(model)
        _ops.ema_update_(ref, list(model), ema.decay(ema.updates))
    plan = ema._plan
    assert type(plan).__name__ == ('CompiledPlan' if backend == 'ext' else 'TorchPlan')
    assert all(torch.equal(a, b) for a, b in zip(ema.ema.parameters(), ref))
    assert ema.ema[0]._version > v0  # bumped like any in-place op

    model[2].data = model[2].data.bfloat16()  # same Parameter object, new dtype and memory
    ema.update(model)
    _ops.ema_update_(ref, list(model), ema.decay(ema.updates))
    assert ema._plan is not plan and all(torch.equal(a, b) for a, b in zip(ema.ema.parameters(), ref))

    before_e, before_m = snapshot(ema.ema.parameters()), snapshot(model.parameters())
    keep = ema.ema[1].data
    ema.ema[1].data = model[1].data  # now aliases a model tensor
    with pytest.raises(ValueError, match='shares memory'):
        ema.update(model)
    assert_untouched(before_m, list(model.parameters()))
    ema.ema[1].data = keep
    assert_untouched(before_e, list(ema.ema.parameters()))
    for bad, exc in ((1.5, ValueError), (float('nan'), ValueError), ('0.5', TypeError),
                     (torch.tensor([0.5, 0.5]), TypeError), (torch.tensor(1.5, dtype=torch.float64), ValueError),
                     (ema.ema[1].view(-1)[4], ValueError), (model[0].view(-1)[0], ValueError)):
        ema.decay = lambda x, bad=bad: bad
        with pytest.raises(exc):
            ema.update(model)
    assert_untouched(before_e, list(ema.ema.parameters()))
    assert ema.updates == 4


@pytest.mark.parametrize('case', ['length', 'shape'])
def test_fake_kernel_refuses_what_the_kernels_refuse(device, case):
    """Under FakeTensorMode (torch.compile's tracing) only the fake kernel runs: it must raise as the real ones do."""
    if not _ops.COMPILED:
        pytest.skip('fake kernels are registered with the compiled ops')
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        e = [torch.empty(3, device=device), torch.empty(4, device=device)]
        m = [torch.empty(3, device=device)] if case == 'length' else [torch.empty(3, device=device),
                                                                        torch.empty(5, device=device)]
        with pytest.raises(ValueError, match='differ in length' if case == 'length' else 'differ in shape'):
            torch.ops.torchutils_ext.ema_update_(e, m, 0.5, 'yolov5')
