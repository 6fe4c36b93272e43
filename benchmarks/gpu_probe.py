"""Where the time of one ModelEMA update goes on a GPU: kernels alone (replay of a captured graph after an L2
flush), host work alone, and the benchmark's wall metric, for yolov5s/l against cached ``torch._foreach_lerp_``;
and the launch cost of each parameter-table tier. Run by ``benchmarks/gpu_check.sh quick`` after the CUDA tests
(the correctness checks live in tests/), in well under its 40 s.

    python benchmarks/gpu_probe.py [--models s,l]
"""
import argparse
import os
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tests'))
import torchutils_ext as tx  # noqa: E402
from torchutils_ext import _ema_plan  # noqa: E402
from yolo_models import build_yolov5  # noqa: E402


def graph_us(fn, reps=30):
    """Device time of fn's kernels alone: replay of a captured graph after an L2 flush."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    flush, ts = torch.empty(64 << 20, device='cuda'), []
    for _ in range(reps):
        flush.fill_(1.0)
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return sorted(ts)[reps // 2] * 1e3


def host_us(fn, reps=100):
    ts = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[reps // 2] * 1e6


def wall_us(fn, reps=30):
    """The benchmark's metric: events around the call on an idle GPU (host work and kernels)."""
    flush, ts = torch.empty(64 << 20, device='cuda'), []
    for _ in range(reps):
        flush.fill_(1.0)
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return sorted(ts)[reps // 2] * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--models', default='s,l')
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit('gpu_probe: no CUDA device')
    print('torch', torch.__version__, '·', torch.cuda.get_device_name(), '·', tx.backend_info().get('build'))
    a = torch.empty(256 << 20 >> 2, device='cuda')
    b = torch.empty_like(a)
    roof = 3 * a.nbytes / (graph_us(lambda: a.add_(b), 20) * 1e-6) / 1e12
    print(f'roofline add_ 256 MiB: {roof:.2f} TB/s')
    a = b = None
    for size in args.models.split(','):
        model = build_yolov5(size).cuda()
        ema = tx.ModelEMA(model)
        ema.update(model)
        plan = ema._plan
        el = [t for t in ema.ema.state_dict().values() if t.dtype.is_floating_point]
        ml = [t for t in model.state_dict().values() if t.dtype.is_floating_point]
        nbytes = sum(3 * t.nbytes for t in el)
        fl = [t.clone() for t in el]
        d = torch.tensor(0.999, device='cuda')
        k_ours = graph_us(lambda: plan.step(ema.ema, model, d))
        k_fe = graph_us(lambda: torch._foreach_lerp_(fl, ml, 0.001))
        print(f'yolov5{size}: {len(el)} tensors, {nbytes / 1e6:.1f} MB moved; kernels: ours {k_ours:.1f} us '
              f'({nbytes / (k_ours * 1e-6) / 1e12:.2f} TB/s, {nbytes / (k_ours * 1e-6) / 1e12 / roof:.0%} of add_), '
              f'foreach_lerp {k_fe:.1f} us')
        print(f'  host: ModelEMA.update {host_us(lambda: ema.update(model)):.1f} us, plan step '
              f'{host_us(lambda: plan.step(ema.ema, model, 0.999)):.1f} us, foreach_lerp '
              f'{host_us(lambda: torch._foreach_lerp_(fl, ml, 0.001)):.1f} us')
        print(f'  wall (bench metric): ModelEMA.update {wall_us(lambda: ema.update(model)):.1f} us, '
              f'foreach_lerp {wall_us(lambda: torch._foreach_lerp_(fl, ml, 0.001)):.1f} us')
    for k in (64, 65, 129, 257, 513, 1025):  # table tiers: the parameter block each launch copies
        hold = lambda v: nn.ParameterList([nn.Parameter(torch.full((1,), v, device='cuda'), requires_grad=False)  # noqa: E731
                                           for _ in range(k)])
        e, m = hold(0.0), hold(1.0)
        plan = _ema_plan.make_plan(e, m, 'yolov5')
        print(f'{k} one-element pairs: plan step host {host_us(lambda: plan.step(e, m, 0.5)):.1f} us, '
              f'wall {wall_us(lambda: plan.step(e, m, 0.5)):.1f} us')
    print('probe: done')


if __name__ == '__main__':
    main()
