"""What only CUDA has: graph capture (torch.cuda.graph, torch.compile's CUDA graphs), one launch per update, the
parameter-table tiers and the small-table fallback, sizes past 2^31 / 2^32, and bit parity with the CPU kernels.

Every op test (dtypes, strides, bad input, the guard, the plan) runs on CUDA too, through the `device` fixture
(tests/conftest.py). Skipped (each with the reason) on machines without a GPU; benchmarks/gpu_check.sh runs them
on a lent GPU.
"""
import copy
import functools

import pytest
import torch
import torch.nn as nn

import torchutils_ext as tx
from torchutils_ext import _ops

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU'),
              pytest.mark.skipif(not (_ops.COMPILED and _ops._has_kernel('ema_update_', 'cuda')),
                                 reason='CUDA kernels not built')]


def make(shapes, dtype, seed, device='cuda'):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(device=device, dtype=dtype) for s in shapes]


SHAPES = [(3,), (17, 5), (64, 32, 3, 3), (1,), (100003,), (2, 3, 4, 5), (8192 * 3 + 1,)]


def test_kernels_registered_for_cuda():
    for op in ('ema_update_.Scalar', 'ema_update_.Tensor', 'count_zeros', 'fold_conv_bn', 'fold_conv_bn_'):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f'torchutils_ext::{op}', 'CUDA'), op


def test_ema_decay_tensor_in_cuda_graph():
    ema, model = make(SHAPES, torch.float32, 7), make(SHAPES, torch.float32, 8)
    ref = [e.clone() for e in ema]
    decay = torch.tensor(0.5, device='cuda')
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up outside capture
        torch.ops.torchutils_ext.ema_update_(ema, model, decay, 'yolov5')
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        torch.ops.torchutils_ext.ema_update_(ema, model, decay, 'yolov5')
    # the warm-up ran once with 0.5 (capture does not run kernels); replays read the tensor's new values
    ref_vals = [0.5]
    for d in (0.25, 0.875):  # exact in float32, so the Python-float reference uses the same d and 1 - d
        decay.fill_(d)
        graph.replay()
        ref_vals.append(d)
    torch.cuda.synchronize()
    for d in ref_vals:
        for v, m in zip(ref, model):
            v *= d
            v += (1 - d) * m
    assert all(torch.equal(a, b) for a, b in zip(ref, ema))


def test_model_ema_update_is_one_launch():
    from yolo_models import build_yolov5
    model = build_yolov5('s').cuda()
    ema = tx.ModelEMA(model)
    ema.update(model)
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        ema.update(model)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    names = {e.name for e in kernels}
    assert len(kernels) == 1, names
    assert 'ema_kernel' in next(iter(names))


def test_ema_plan_on_cuda_matches_cpu_and_captures():
    """ModelEMA's plan on CUDA (one C++ call per step): same bits as the CPU kernel; decay as a device tensor
    inside a captured graph (the call releases the GIL around the launch); a .data swap to bf16 makes the plan
    stale, and the rebuilt one follows."""
    import torch.nn as nn

    from torchutils_ext import _ema_plan
    hold = lambda ts: nn.ParameterList([nn.Parameter(t, requires_grad=False) for t in ts])  # noqa: E731
    ema, model = hold(make(SHAPES, torch.float32, 9)), hold(make(SHAPES, torch.float32, 10))
    cpu_e, cpu_m = [t.cpu() for t in ema], [t.cpu() for t in model]
    plan = _ema_plan.make_plan(ema, model, 'yolov5')
    assert type(plan).__name__ == 'CompiledPlan' and plan.step(ema, model, 0.75)
    torch.ops.torchutils_ext.ema_update_(cpu_e, cpu_m, 0.75, 'yolov5')
    assert all(torch.equal(a.cpu(), b) for a, b in zip(ema, cpu_e))
    decay = torch.tensor(0.5, device='cuda')
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        assert plan.step(ema, model, decay)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        plan.step(ema, model, decay)
    decay.fill_(0.25)
    graph.replay()
    torch.cuda.synchronize()
    for d in (0.5, 0.25):
        torch.ops.torchutils_ext.ema_update_(cpu_e, cpu_m, d, 'yolov5')
    assert all(torch.equal(a.cpu(), b) for a, b in zip(ema, cpu_e))
    model[1].data = model[1].data.bfloat16()
    assert not plan.step(ema, model, 0.5)
    plan = _ema_plan.make_plan(ema, model, 'yolov5')
    assert plan.step(ema, model, 0.5)
    cpu_m[1] = model[1].cpu()
    torch.ops.torchutils_ext.ema_update_(cpu_e, cpu_m, 0.5, 'yolov5')
    assert all(torch.equal(a.cpu(), b) for a, b in zip(ema, cpu_e))


FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
ALL_PAIRS = [(e, m) for e in FLOATS for m in FLOATS]


def _every_pair_lists(seed):
    """One list mixing all 16 (EMA, model) dtype pairs: odd sizes (vector tails), views one element into their
    storage (misaligned: the scalar path), and zero-element tensors."""
    g = torch.Generator().manual_seed(seed)
    ema, model = [], []
    for k, (edt, mdt) in enumerate(ALL_PAIRS):
        for n, offset in ((8192 * 2 + 5, 0), (1001, 1), (0, 0), (3 + k, 1)):
            e = torch.randn(n + offset, generator=g).to(device='cuda', dtype=edt)[offset:]
            m = torch.randn(n + offset, generator=g).to(device='cuda', dtype=mdt)[offset:]
            ema.append(e)
            model.append(m)
    return ema, model


@pytest.mark.parametrize('mode', ['yolov5', 'lerp'])
@pytest.mark.parametrize('decay', ['float', 'cuda float64 tensor', 'cpu float64 tensor'])
def test_ema_every_dtype_pair_matches_cpu_kernel(mode, decay):
    """The README's cross-device claim, which needs both devices in one test: the CUDA kernels give the CPU
    kernels' bits for all 16 dtype pairs, both modes, every decay form."""
    ema, model = _every_pair_lists(11)
    cpu_e, cpu_m = [e.cpu() for e in ema], [m.cpu() for m in model]
    d = {'float': 0.9993, 'cuda float64 tensor': torch.tensor(0.9993, dtype=torch.float64, device='cuda'),
         'cpu float64 tensor': torch.tensor(0.9993, dtype=torch.float64)}[decay]
    with tx.use_backend('ext'):
        _ops.ema_update_(ema, model, d, mode=mode)
        _ops.ema_update_(cpu_e, cpu_m, 0.9993, mode=mode)
    for e, c in zip(ema, cpu_e):
        assert torch.equal(e.cpu(), c), (e.dtype, e.numel())


@pytest.mark.parametrize('n', [64, 65, 128, 129, 256, 257, 512, 513, 1024, 1025, 2049])
def test_ema_and_count_zeros_across_table_capacities(n):
    """Lists on each side of every table tier (64, 128, 256, 512, 1024 entries; over 1024: several launches)."""
    sizes = [i % 37 + 1 for i in range(n)]
    ema, model = make(sizes, torch.float32, 12), make(sizes, torch.bfloat16, 13)
    cpu_e, cpu_m = [e.cpu() for e in ema], [m.cpu() for m in model]
    with tx.use_backend('ext'):
        _ops.ema_update_(ema, model, 0.9993)
        _ops.ema_update_(cpu_e, cpu_m, 0.9993)
        assert all(torch.equal(a.cpu(), b) for a, b in zip(ema, cpu_e))
        for e in ema[::3]:
            e[::2] = 0
        assert int(_ops.count_zeros(ema)) == sum(int((e == 0).sum()) for e in ema)


SMALL_PARAMS_PROBE = '''
import torch, torchutils_ext as tx
from torchutils_ext import _ops
sizes = [i % 37 + 1 for i in range(1025)]
ema = [torch.randn(s, device='cuda') for s in sizes]
model = [torch.randn(s, device='cuda').half() for s in sizes]
cpu_e, cpu_m = [e.cpu() for e in ema], [m.cpu() for m in model]
with tx.use_backend('ext'):
    _ops.ema_update_(ema, model, 0.9993)
    _ops.ema_update_(cpu_e, cpu_m, 0.9993)
    assert all(torch.equal(a.cpu(), b) for a, b in zip(ema, cpu_e))
    for e in ema[::2]:
        e[0] = 0
    assert int(_ops.count_zeros(ema)) == sum(int((e == 0).sum()) for e in ema)
print('ok')
'''


def test_small_parameter_tables_fallback():
    """Without 32 KB kernel parameters (a CUDA runtime or driver before 12.1) the 64-entry tables serve any list:
    forced here with TORCHUTILS_EXT_SMALL_PARAMS=1 in a fresh process (the answer is cached per process)."""
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TORCHUTILS_EXT_SMALL_PARAMS='1')
    p = subprocess.run([sys.executable, '-c', SMALL_PARAMS_PROBE], cwd=root, env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0 and p.stdout.strip().endswith('ok'), p.stderr[-3000:]


def test_cpu_decay_tensor_refused_while_capturing():
    ema, model = make(SHAPES, torch.float32, 14), make(SHAPES, torch.float32, 15)
    ema.append(torch.randn(8, 6, device='cuda')[:, ::2])  # a strided pair: the ATen path
    model.append(torch.randn(8, 3, device='cuda'))
    before = [e.clone() for e in ema]
    decay = torch.tensor(0.5, dtype=torch.float64)  # on the CPU
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(ValueError, match='CPU decay tensor'):
        with torch.cuda.graph(graph, stream=s):
            torch.ops.torchutils_ext.ema_update_(ema, model, decay, 'yolov5')
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(ema, before))


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize('layers', [4, 32, 33, 257])
def test_fold_inplace_low_and_double_precision_matches_cpu_kernel(dtype, layers):
    """fold_conv_bn_ on CUDA, same bits as the CPU kernel, across the fold table's capacities (32, 256)."""
    g = torch.Generator().manual_seed(layers)
    shapes = [((4 + i % 5, 3, 3, 3) if i % 3 else (6, 5 + i % 4)) for i in range(layers)]
    weight = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    chans = [s[0] for s in shapes]
    vecs = lambda lo=0.0: [(torch.rand(c, generator=g) + lo).to(dtype) for c in chans]  # noqa: E731
    bias, bn_w, bn_b, mean, var = vecs(), vecs(), vecs(), vecs(), vecs(0.5)
    eps, groups = [1e-5] * layers, [0] * layers
    cuda = lambda xs: [x.cuda() for x in xs]  # noqa: E731
    w_gpu = cuda(weight)
    with tx.use_backend('ext'):
        _, b_cpu = _ops.fold_conv_bn(weight, bias, bn_w, bn_b, mean, var, eps, groups, inplace=True)
        _, b_gpu = _ops.fold_conv_bn(w_gpu, cuda(bias), cuda(bn_w), cuda(bn_b), cuda(mean), cuda(var), eps, groups,
                                     inplace=True)
    assert all(torch.equal(a.cpu(), b) for a, b in zip(w_gpu, weight))
    assert all(torch.equal(a.cpu(), b) for a, b in zip(b_gpu, b_cpu))


@pytest.mark.slow
def test_ema_past_2_31_elements_and_count_zeros_past_2_32():
    """Element indices past int32 (17 GB of fp32 for the EMA, 4 GB of bytes for the count): 64-bit offsets in
    both kernels."""
    free, _ = torch.cuda.mem_get_info()
    if free < 24 << 30:
        pytest.skip('needs 24 GB of free GPU memory')
    n = 2 ** 31 + 3
    e, m = torch.zeros(n, device='cuda'), torch.ones(n, device='cuda')
    torch.ops.torchutils_ext.ema_update_([e], [m], 0.5, 'yolov5')
    assert bool((e == 0.5).all()) and e[-1].item() == 0.5
    del e, m
    z = torch.zeros(2 ** 32 + 10, dtype=torch.uint8, device='cuda')
    z[-1] = 1
    assert int(_ops.count_zeros([z])) == 2 ** 32 + 9
    del z
    torch.cuda.empty_cache()


def _train_parts():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.SiLU(), nn.Linear(32, 4)).cuda()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, capturable=True)
    return model, opt, tx.ModelEMA(model, tau=5, capturable=True, skip_nonfinite=True)


def _train_step(model, opt, ema, x, y, set_to_none=False):
    opt.zero_grad(set_to_none=set_to_none)  # a captured graph needs the grads kept (static)
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    ema.update(model)


def _eager_and_captured(make_eager, make_captured, warm, replays, seed):
    """warm + replays eager training steps, and the same count as warm eager steps then graph replays of one
    captured step: (eager parts, captured parts), synchronised."""
    g = torch.Generator(device='cuda').manual_seed(seed)
    x, y = torch.randn(8, 16, device='cuda', generator=g), torch.randn(8, 4, device='cuda', generator=g)
    eager = make_eager()
    for _ in range(warm + replays):
        _train_step(*eager, x, y)
    captured = make_captured()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warm):
            _train_step(*captured, x, y)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _train_step(*captured, x, y)
    for _ in range(replays):
        graph.replay()
    torch.cuda.synchronize()
    return eager, captured


def test_capturable_ema_in_a_captured_training_step():
    """Forward, backward, Adam(capturable) and ModelEMA(capturable, skip_nonfinite) captured in one CUDA graph:
    3 eager warm-up steps + 5 replays equal 8 eager steps bit for bit, and the counter advanced on the device."""
    eager, captured = _eager_and_captured(_train_parts, _train_parts, warm=3, replays=5, seed=1)
    assert captured[2].updates == eager[2].updates == 8 and captured[2].skipped == 0
    for (k, a), b in zip(captured[2].ema.state_dict().items(), eager[2].ema.state_dict().values()):
        assert torch.equal(a, b), k


def test_capturable_ema_under_reduce_overhead_compile(monkeypatch):
    """torch.compile(mode='reduce-overhead') must record the step into CUDA graphs and replay them: inductor skips
    a graph that mutates an input it does not manage (the counter and guard are marked static for that), silently
    unless cudagraph_or_error is set. So: no skip (an error where torch has the flag, the skip counter elsewhere),
    graphs captured, and a last step that runs by replay alone and still advances the EMA like the eager twin."""
    import torch._inductor.config as inductor_config
    from torch._dynamo.utils import counters
    calls = {'capture': 0, 'replay': 0}

    def counted(name, fn):
        def wrapper(self, *args, **kwargs):
            calls[name] += 1
            return fn(self, *args, **kwargs)
        return wrapper
    monkeypatch.setattr(torch.cuda.CUDAGraph, 'capture_begin', counted('capture', torch.cuda.CUDAGraph.capture_begin))
    monkeypatch.setattr(torch.cuda.CUDAGraph, 'replay', counted('replay', torch.cuda.CUDAGraph.replay))
    if hasattr(inductor_config.triton, 'cudagraph_or_error'):
        monkeypatch.setattr(inductor_config.triton, 'cudagraph_or_error', True)
    torch._dynamo.reset()
    counters.clear()
    g = torch.Generator(device='cuda').manual_seed(2)
    x, y = torch.randn(8, 16, device='cuda', generator=g), torch.randn(8, 4, device='cuda', generator=g)
    eager, compiled = _train_parts(), _train_parts()
    # grads set to None: the backward graph's outputs become them, not inputs a graph mutates (zero_())
    step = torch.compile(functools.partial(_train_step, set_to_none=True), mode='reduce-overhead')
    for _ in range(5):
        _train_step(*eager, x, y)
        step(*compiled, x, y)
    torch.cuda.synchronize()
    before, captures, replays = [t.clone() for t in compiled[2].ema.state_dict().values()], calls['capture'], calls['replay']
    _train_step(*eager, x, y)
    step(*compiled, x, y)
    torch.cuda.synchronize()
    assert counters['inductor']['cudagraph_skips'] == 0, dict(counters['inductor'])
    assert captures >= 1 and calls['capture'] == captures and calls['replay'] > replays, calls
    after = list(compiled[2].ema.state_dict().values())
    assert any(not torch.equal(a, b) for a, b in zip(before, after) if a.is_floating_point())
    assert compiled[2].updates == eager[2].updates == 6 and compiled[2].skipped == 0
    for (k, a), b in zip(compiled[2].ema.state_dict().items(), eager[2].ema.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)


def test_device_decay_out_of_range_in_a_captured_graph():
    """[decay tensor] under capture: each replay reads the decay tensor's current value; a NaN or out-of-range
    one writes nothing and the guard counts it, a valid one updates, all on the device."""
    ema, model = make(SHAPES, torch.float32, 16), make(SHAPES, torch.bfloat16, 17)
    cpu_e, cpu_m = [e.cpu() for e in ema], [m.cpu() for m in model]
    decay = torch.tensor(0.5, dtype=torch.float64, device='cuda')
    guard = torch.zeros(2, dtype=torch.int64, device='cuda')
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        torch.ops.torchutils_ext.ema_update_(ema, model, decay, 'yolov5', guard)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        torch.ops.torchutils_ext.ema_update_(ema, model, decay, 'yolov5', guard)
    torch.ops.torchutils_ext.ema_update_(cpu_e, cpu_m, 0.5, 'yolov5')
    for d in (float('nan'), 1.5, -0.5, 0.25):
        decay.fill_(d)
        graph.replay()
    torch.ops.torchutils_ext.ema_update_(cpu_e, cpu_m, 0.25, 'yolov5')
    torch.cuda.synchronize()
    assert guard.tolist() == [0, 3]
    assert all(torch.equal(a.cpu(), b) for a, b in zip(ema, cpu_e))


@pytest.mark.parametrize('edt,mdt', [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                     (torch.float16, torch.float32), (torch.float64, torch.float64)])
def test_guard_on_cuda_matches_cpu(edt, mdt):
    """The device check pass: a NaN/Inf anywhere (any table, any dtype) skips the whole update and counts it."""
    n = 70
    e = [torch.randn(1000 + i, dtype=torch.float64).to(edt) for i in range(n)]
    m = [torch.randn(1000 + i, dtype=torch.float64).to(mdt) for i in range(n)]
    ge, gm = [t.cuda() for t in e], [t.cuda() for t in m]
    guard = torch.zeros(2, dtype=torch.int64, device='cuda')
    _ops.ema_update_(ge, gm, 0.9993, guard=guard)
    _ops.ema_update_(e, m, 0.9993)
    assert guard.tolist() == [0, 0] and all(torch.equal(a.cpu(), b) for a, b in zip(ge, e))
    gm[67][999] = float('inf')
    before = [t.clone() for t in ge]
    _ops.ema_update_(ge, gm, 0.9993, guard=guard)
    assert guard.tolist() == [1, 1] and all(torch.equal(a, b) for a, b in zip(ge, before))


@pytest.mark.parametrize('decay', [0.0, 1.0])
@pytest.mark.parametrize('where', ['float', 'cuda tensor'])
def test_exact_ends_match_the_cpu_kernel(decay, where):
    """[exact ends] on CUDA, every dtype pair: decay 1 leaves every bit (Inf in the model), decay 0 gives copy_'s
    bits (Inf/NaN in the EMA, -0.0 in the model), the same as the CPU kernel and as torch's copy_ on CUDA."""
    ema, model = _every_pair_lists(13)
    for e, m in zip(ema, model):
        if e.numel() > 3:
            e[0], e[1], m[2], m[3] = float('inf'), float('nan'), -0.0, float('inf')
    cpu_e, cpu_m = [e.cpu() for e in ema], [m.cpu() for m in model]
    d = decay if where == 'float' else torch.tensor(decay, dtype=torch.float64, device='cuda')
    want = [e.clone() if decay == 1.0 else e.clone().copy_(m) for e, m in zip(ema, model)]
    guard = torch.zeros(2, dtype=torch.int64, device='cuda')
    with tx.use_backend('ext'):
        _ops.ema_update_(ema, model, d, guard=guard if decay == 1.0 else None)
        _ops.ema_update_(cpu_e, cpu_m, decay)
    for e, c, w in zip(ema, cpu_e, want):
        assert torch.equal(e.cpu().view(-1).view(torch.uint8), c.view(-1).view(torch.uint8)), (e.dtype, e.numel())
        assert torch.equal(e.view(-1).view(torch.uint8), w.view(-1).view(torch.uint8))
    if decay == 1.0:
        assert guard.tolist() == [0, 0]  # nothing checked, nothing counted, though the model holds an Inf


def _options_parts(device, capturable):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.SiLU(), nn.Linear(32, 4)).to(device)
    # Adam capturable on both sides (its capturable math rounds otherwise): only the EMA's mode differs
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, capturable=True)
    return model, opt, tx.ModelEMA(model, schedule='warmup', decay=0.99, update_every_n_steps=3,
                                   update_after_step=1, buffers='copy', capturable=capturable,
                                   skip_nonfinite=True)


def test_options_captured_in_a_graph_match_eager():
    """Warm-up schedule, a copy phase, every third step and copied buffers, all decided on the device: 4 eager
    steps + 8 graph replays equal 12 eager steps of capturable=False bit for bit."""
    eager, captured = _eager_and_captured(lambda: _options_parts('cuda', False), lambda: _options_parts('cuda', True),
                                          warm=4, replays=8, seed=3)
    assert captured[2].updates == eager[2].updates == 12 and captured[2].skipped == 0
    for (k, a), b in zip(captured[2].ema.state_dict().items(), eager[2].ema.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize('bad_step', [5, 6])
def test_options_guard_on_cuda_matches_cpu(bad_step):
    """The same options on CUDA (capturable) and on the CPU (eager), a NaN at step 5 (an averaging step: with
    update_after_step=0, step 1 copies and 2, 5, 8 average) or 6 (one that writes nothing): the same EMA bits and
    the same skip count."""
    model = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.SiLU(), nn.Linear(32, 4))
    gpu_model = copy.deepcopy(model).cuda()
    kw = dict(decay=0.9, tau=3, update_every_n_steps=3, update_after_step=0, buffers='copy', skip_nonfinite=True)
    cpu, gpu = tx.ModelEMA(model, **kw), tx.ModelEMA(gpu_model, capturable=True, **kw)
    g = torch.Generator().manual_seed(4)
    for step in range(1, 10):
        with torch.no_grad():
            for t in model.state_dict().values():
                if t.dtype.is_floating_point:
                    t.add_(torch.randn(t.shape, generator=g) * 0.1)
            if step == bad_step:
                model[3].weight[0, 0] = float('nan')
            gpu_model.load_state_dict(model.state_dict())
        cpu.update(model)
        gpu.update(gpu_model)
        if step == bad_step:
            with torch.no_grad():
                model[3].weight[0, 0] = 0.0
    assert cpu.skipped == gpu.skipped == (1 if bad_step == 5 else 0)
    for (k, a), b in zip(gpu.ema.state_dict().items(), cpu.ema.state_dict().values()):
        assert torch.equal(a.cpu(), b), k


def test_swap_ema_weights_on_cuda():
    model = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32)).cuda()
    ema = tx.ModelEMA(model, decay=0.5, tau=1)
    with torch.no_grad():
        model[0].weight.add_(1)
    ema.update(model)
    own = copy.deepcopy(model.state_dict())
    with ema.swap_ema_weights(model):
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ema.ema.state_dict().values()))
    assert all(torch.equal(own[k], v) for k, v in model.state_dict().items())
