"""Every compiled CPU kernel run at one thread count, in a process of its own: `python cpu_threads_cases.py N OUT`
sets torch.set_num_threads(N) before any parallel work (the native thread pool takes it only then), runs each
op on fixed inputs and saves to OUT what each op produced and how many threads ran each kernel.
test_cpu_threads.py runs it at 1, 2 and 3 threads and compares. The inputs are big enough for every kernel to
use 3 threads (parallel.h: kMinBytesPerThread = 256 KiB per thread) and mix sizes, so that the per-thread ranges
end inside lists, after tiny tensors and at odd lengths.
"""
import ctypes
import os
import sys

import torch

KERNELS = ('ema_update', 'nonfinite_check', 'count_zeros', 'fold_scale')  # CpuKernel in csrc/common/parallel.h
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
SIZES = (70001, 3, 150000, 17, 1, 262147, 4099)  # 486268 elements: past 3 x 256 KiB for every kernel


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def ema_inputs(edt, mdt, seed):
    g = _gen(seed)
    ema = [torch.randn(n, generator=g).to(edt) for n in SIZES]
    model = [torch.randn(n, generator=g).to(mdt) for n in SIZES]
    # one strided pair (the kernels walk a contiguous copy) and one channels_last pair
    ema.append(torch.randn(64, 300, generator=g).to(edt)[:, ::3])
    model.append(torch.randn(64, 100, generator=g).to(mdt))
    cl = torch.randn(8, 16, 9, 9, generator=g).contiguous(memory_format=torch.channels_last)
    ema.append(cl.to(edt))
    model.append(cl.flip(0).to(mdt))
    return ema, model


GUARD_CASES = {'finite': None, 'nan_last': (6, -1, float('nan')), 'inf_tiny': (4, 0, float('inf')),
               'ninf_middle': (2, 75000, float('-inf'))}


def guard_inputs(case, mdt, seed=7):
    ema, model = ema_inputs(torch.float32, mdt, seed)
    where = GUARD_CASES[case]
    if where is not None:
        i, k, v = where
        model[i][k] = v
    return ema, model


def count_inputs(seed=11):
    g = _gen(seed)
    out = []
    for n, dt in zip(SIZES, (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int8,
                             torch.float32)):
        t = torch.randn(n, generator=g).to(dt) if dt.is_floating_point else torch.randint(-3, 3, (n,), generator=g,
                                                                                           dtype=dt)
        if dt.is_floating_point:
            t[torch.rand(n, generator=g) < 0.3] = 0.0
            t[torch.rand(n, generator=g) < 0.05] = -0.0
        out.append(t)
    return out


def fold_inputs(seed=13):
    """Layers of every float dtype: Conv2d (contiguous and channels_last), a grouped ConvTranspose, Linear."""
    g = _gen(seed)
    shapes = [((256, 128, 3, 3), 0), ((96, 64, 3, 3), 0), ((5, 3, 1, 1), 0), ((128, 32, 3, 3), 2), ((300, 500), 0)]
    args = [[] for _ in range(8)]
    for k, ((shape, groups), dt) in enumerate(zip(shapes * 2, DTYPES * 3)):
        w = torch.randn(shape, generator=g).to(dt)
        if k == 1:
            w = w.contiguous(memory_format=torch.channels_last)
        c = shape[1] * groups if groups else shape[0]
        vec = lambda lo=-1.0, hi=1.0: (torch.rand(c, generator=g) * (hi - lo) + lo).to(dt)  # noqa: E731
        for a, v in zip(args, (w, vec() if k % 2 else None, vec(), vec(), vec(), vec(0.2, 2.0), 1e-3, groups)):
            a.append(v)
    return args


def _threads_used(lib):
    return {name: lib.torchutils_ext_cpu_threads_used(k) for k, name in enumerate(KERNELS)}


def _omp_runtimes():
    """Paths of the OpenMP runtimes mapped in this process (Linux; an empty list elsewhere)."""
    try:
        with open('/proc/self/maps') as f:
            paths = {line.split()[-1] for line in f if '/' in line}
    except OSError:
        return []
    return sorted(p for p in paths if os.path.basename(p).startswith(('libgomp', 'libomp', 'libiomp')))


def run(threads):
    torch.set_num_threads(threads)
    import torchutils_ext as tx
    from torchutils_ext import _ops
    assert _ops.COMPILED, _ops._LOAD_ERROR
    lib = ctypes.CDLL(tx._C.__file__)  # the loaded library: its threads-used record
    op = torch.ops.torchutils_ext
    out, used = {'threads': torch.get_num_threads(), 'omp_runtimes': _omp_runtimes()}, {}

    def note(key, kernels):
        got = _threads_used(lib)
        used[key] = {k: got[k] for k in kernels}

    for mode in ('yolov5', 'lerp'):
        for edt in DTYPES:
            for mdt in DTYPES:
                ema, model = ema_inputs(edt, mdt, seed=DTYPES.index(edt) * 4 + DTYPES.index(mdt))
                op.ema_update_(ema, model, 0.9993, ema_mode=mode)
                key = f'ema {mode} {edt} {mdt}'
                out[key] = ema
                note(key, ('ema_update',))
    for case in GUARD_CASES:
        for mdt in (torch.float32, torch.bfloat16):
            ema, model = guard_inputs(case, mdt)
            guard = torch.zeros(2, dtype=torch.int64)
            op.ema_update_(ema, model, 0.99, guard=guard)
            key = f'guard {case} {mdt}'
            out[key] = (ema, guard)
            note(key, ('nonfinite_check',) + (('ema_update',) if case == 'finite' else ()))
    out['count'] = op.count_zeros(count_inputs())
    note('count', ('count_zeros',))
    args = fold_inputs()
    out['fold'] = op.fold_conv_bn(*args)
    note('fold', ('fold_scale',))
    op.fold_conv_bn_(args[0], [torch.empty_like(b) for b in out['fold'][1]], *args[1:])
    out['fold_'] = args[0]
    note('fold_', ('fold_scale',))

    # through the user's calls: ModelEMA (the C++ plan) with the guard, fuse_model, sparsity on a YOLOv5n
    from yolo_models import build_yolov5
    model = build_yolov5('n', seed=3).eval()
    ema = tx.ModelEMA(model, skip_nonfinite=True)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.01)
    ema.update(model)
    out['ModelEMA'] = ema.ema.state_dict()
    note('ModelEMA', ('ema_update', 'nonfinite_check'))
    out['sparsity'] = tx.sparsity(model)
    note('sparsity', ('count_zeros',))
    out['fuse_model'] = tx.fuse_model(model).state_dict()
    note('fuse_model', ('fold_scale',))
    out['threads_used'] = used
    return out


if __name__ == '__main__':
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    torch.save(run(int(sys.argv[1])), sys.argv[2])
