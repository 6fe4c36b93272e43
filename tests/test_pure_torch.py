"""The pure-torch path's own machinery, at its edges: cache-sized EMA chunks, packed zero counting, the batched
per-channel fold vectors, and the rule that it does no float64 work on a device without float64 (MPS).

Each case is checked against an independent reference (the seed's formula, `(t == 0).sum()`, one layer at a
time) and, where the compiled ops are built, against them bit for bit.
"""
import threading

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode


from torchutils_ext import _ops, _torch_ops


def _lists(edt, mdt, seed=0):
    g = torch.Generator().manual_seed(seed)
    big = (40, 3)  # 120 elements: several chunks once CHUNK is small
    es = [torch.randn(big, generator=g), torch.randn(9, 13, generator=g).t(), torch.randn((), generator=g),
          torch.randn(0, generator=g), torch.randn(5, generator=g), torch.randn(2, 3, 4, generator=g)]
    ms = [torch.randn(big, generator=g), torch.randn(9, 13, generator=g).t(), torch.randn((), generator=g),
          torch.randn(0, generator=g), torch.randn(5, generator=g), torch.randn(2, 3, 4, generator=g)]
    assert not es[1].is_contiguous()
    return [e.to(edt) for e in es], [m.to(mdt) for m in ms]


def _seed_formula(es, ms, d, mode):
    """The kernels' numerics, one tensor at a time: math in the EMA's dtype (fp32 for a half EMA)."""
    out = []
    for e, m in zip(es, ms):
        op = torch.float64 if e.dtype == torch.float64 else torch.float32
        v, w = e.to(op), m.to(op)
        if mode == 'yolov5':
            v = v * d
            v = v + (1 - d) * w
        else:
            v = torch.lerp(v, w, 1 - d)
        out.append(v.to(e.dtype))
    return out


@pytest.mark.parametrize('chunk', [7, 1 << 20])
@pytest.mark.parametrize('edt,mdt', [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                     (torch.float32, torch.float16), (torch.float64, torch.float64)])
@pytest.mark.parametrize('mode', ['yolov5', 'lerp'])
def test_chunked_ema_is_the_seed_formula(monkeypatch, chunk, edt, mdt, mode):
    monkeypatch.setattr(_torch_ops, 'CHUNK', chunk)
    es, ms = _lists(edt, mdt)
    d = 0.9993
    want = _seed_formula(es, ms, d, mode)
    got = [e.clone() for e in es]
    _torch_ops.ema_update_(got, ms, d, mode)
    for w, g in zip(want, got):
        assert torch.equal(w, g)
    if _ops.COMPILED:
        ext = [e.clone() for e in es]
        torch.ops.torchutils_ext.ema_update_(ext, ms, d, mode)
        assert all(torch.equal(a, b) for a, b in zip(ext, got))  # 'lerp' too: torch.lerp's one FMA



def _zero_mix(seed=0):
    g = torch.Generator().manual_seed(seed)

    def sparse(*shape, dtype=torch.float32):
        t = torch.randn(shape, generator=g)
        t[torch.rand(shape, generator=g) < 0.3] = 0
        return t.to(dtype)
    ts = [sparse(50), sparse(3, 4), sparse(40, 30).t(), sparse(7, dtype=torch.float16), sparse(9, dtype=torch.bfloat16),
          torch.tensor([0, 1, 0, 2]), torch.tensor([True, False, False]), torch.tensor([-0.0, float('nan'), 0.0,
                                                                                         float('inf')]),
          torch.zeros(0), torch.tensor(0.0), sparse(200)]
    return ts


@pytest.mark.parametrize('chunk', [16, 1 << 18])
def test_packed_zero_count_is_exact(monkeypatch, chunk):
    monkeypatch.setattr(_torch_ops, 'ZERO_CHUNK', chunk)
    monkeypatch.setattr(_torch_ops, '_ZERO_SCRATCH', threading.local())  # buffers of the patched size
    ts = _zero_mix()
    want = sum(int((t == 0).sum()) for t in ts)
    got = _torch_ops.count_zeros(ts)
    assert got.dtype == torch.int64 and got.dim() == 0 and int(got) == want
    if _ops.COMPILED:
        assert int(torch.ops.torchutils_ext.count_zeros(ts)) == want


def test_zero_count_threads_do_not_share_buffers(monkeypatch):
    monkeypatch.setattr(_torch_ops, 'ZERO_CHUNK', 64)
    monkeypatch.setattr(_torch_ops, '_ZERO_SCRATCH', threading.local())
    cases = [_zero_mix(seed) for seed in range(6)]
    want = [sum(int((t == 0).sum()) for t in ts) for ts in cases]
    got = [None] * len(cases)

    def work(i):
        for _ in range(20):
            got[i] = int(_torch_ops.count_zeros(cases[i]))
            if got[i] != want[i]:
                return
    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == want


def _fold_args(dtypes, eps):
    g = torch.Generator().manual_seed(7)
    w, b, bw, bb, mu, var = [], [], [], [], [], []
    for i, dt in enumerate(dtypes):
        c = 3 + i
        w.append(torch.randn(c, 2, 3, 3, generator=g).to(dt))
        b.append(torch.randn(c, generator=g).to(dt) if i % 2 else None)
        bw.append(torch.randn(c, generator=g).to(dt) if i % 3 else None)
        bb.append(torch.randn(c, generator=g).to(dt) if i % 3 else None)
        mu.append(torch.randn(c, generator=g).to(dt))
        var.append((torch.rand(c, generator=g) + 0.5).to(dt))
    return w, b, bw, bb, mu, var, eps, [0] * len(dtypes)


@pytest.mark.parametrize('eps', [[1e-3] * 6, [1e-5, 1e-3, 0.1, 1e-5, 2e-3, 0.0]])
@pytest.mark.parametrize('inplace', [False, True])
def test_batched_fold_equals_one_layer_at_a_time(eps, inplace):
    dtypes = [torch.float32, torch.float16, torch.float32, torch.bfloat16, torch.float64, torch.float32]
    a = _fold_args(dtypes, eps)
    singles = []
    for i in range(len(dtypes)):
        one = [[x[i]] for x in a[:6]] + [[eps[i]], [0]]
        one[0] = [one[0][0].clone()]
        singles.append(_torch_ops.fold_conv_bn(*one))
    w_in = [t.clone() for t in a[0]]
    ws, bs = _torch_ops.fold_conv_bn(w_in, *a[1:], inplace=inplace)
    for i, ((w1,), (b1,)) in enumerate(singles):
        assert ws[i].dtype == dtypes[i] and torch.equal(ws[i], w1) and torch.equal(bs[i], b1), i
        assert bs[i]._base is None  # its own storage, not a view of the batched vector
        assert (ws[i].data_ptr() == w_in[i].data_ptr()) == inplace
    if _ops.COMPILED:
        we, be = torch.ops.torchutils_ext.fold_conv_bn(list(a[0]), *a[1:])
        for i, dt in enumerate(dtypes):
            if dt != torch.float64:  # fp64: torch's double sqrt is not correctly rounded (README)
                assert torch.equal(we[i], ws[i]) and torch.equal(be[i], bs[i]), i


class _Recorder(TorchDispatchMode):
    """Every op that runs, with the dtypes and devices of its tensor arguments and results."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = torch.utils._pytree.tree_leaves((args, kwargs, out))
        self.seen.append((str(func), {(t.device.type, t.dtype) for t in flat if isinstance(t, torch.Tensor)}))
        return out


def test_no_float64_where_the_device_has_none(monkeypatch):
    """The CPU standing in for MPS: with float64 declared missing, the pure-torch ops (fold vectors, decay
    tensor, EMA, zero count) run without a float64 tensor anywhere."""
    monkeypatch.setattr(_torch_ops, 'has_float64', lambda device: False)
    a = _fold_args([torch.float32, torch.float16, torch.bfloat16], [1e-3, 1e-5, 1e-3])
    es, ms = _lists(torch.float32, torch.bfloat16)
    with _Recorder() as rec:
        _torch_ops.fold_conv_bn(*a)
        _torch_ops.fold_conv_bn([w.clone() for w in a[0]], *a[1:], inplace=True)
        _torch_ops.ema_update_(es, ms, torch.tensor(0.999), 'yolov5')
        _torch_ops.ema_update_(es, ms, 0.999, 'lerp')
        _torch_ops.count_zeros(es + ms)
    assert len(rec.seen) > 20
    f64 = [op for op, ts in rec.seen if any(dt == torch.float64 for _, dt in ts)]
    assert not f64, f'float64 work on a device without float64: {f64}'


def test_float64_recorder_can_fail():
    """The same recorder sees the float64 steps of the default path (on a device that has float64)."""
    a = _fold_args([torch.float32], [1e-3])
    with _Recorder() as rec:
        _torch_ops.fold_conv_bn(*a)
    assert any(dt == torch.float64 for _, ts in rec.seen for _, dt in ts)
