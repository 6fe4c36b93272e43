"""Speed/memory/FLOPs profiling (seed: profile, model_info)."""
import time
from copy import deepcopy
from pathlib import Path

import torch
import torch.nn as nn

from ._log import LOGGER
from .device import select_device


def _gflops(m, x):
    """GFLOPs of one forward of ``m`` on ``x``: thop MACs x 2 like the seed when the ``thop`` module is
    importable (``thop`` or ``ultralytics-thop``), else torch's FlopCounterMode (already FLOPs)."""
    try:
        import thop
    except ImportError:
        thop = None
    if thop is not None:
        return thop.profile(m, inputs=(x,), verbose=False)[0] / 1E9 * 2
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        m(x)
    return counter.get_total_flops() / 1E9


class _Clock:
    # CUDA events on a GPU (no host sync inside the loop), perf_counter elsewhere; elapsed() in ms
    def __init__(self, device):
        self.cuda = device.type == 'cuda'

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def elapsed(self, a, b):
        if self.cuda:
            b.synchronize()
            return a.elapsed_time(b)
        return (b - a) * 1000


def _step(m, x, clock):
    # one forward + backward; returns (y, forward ms, backward ms or nan)
    t0 = clock.mark()
    y = m(x)
    t1 = clock.mark()
    try:
        (sum(yi.sum() for yi in y) if isinstance(y, list) else y).sum().backward()
        t2 = clock.mark()
    except Exception:  # no backward method
        return y, clock.elapsed(t0, t1), float('nan')
    return y, clock.elapsed(t0, t1), clock.elapsed(t1, t2)


def profile(input, ops, n=10, device=None):
    """YOLOv5 speed/memory/FLOPs profiler; prints a table, returns per op [p, GFLOPs, mem, tf, tb, s_in, s_out]
    (or None when the op failed). Usage: profile(torch.randn(16, 3, 640, 640), [lambda x: x * x.sigmoid(),
    nn.SiLU()], n=100)."""
    results = []
    if not isinstance(device, torch.device):
        device = select_device(device)
    clock = _Clock(device)
    print(f"{'Params':>12s}{'GFLOPs':>12s}{'GPU_mem (GB)':>14s}{'forward (ms)':>14s}{'backward (ms)':>14s}"
          f"{'input':>24s}{'output':>24s}")
    for x in input if isinstance(input, list) else [input]:
        x = x.to(device)
        x.requires_grad = True
        for m in ops if isinstance(ops, list) else [ops]:
            m = m.to(device) if hasattr(m, 'to') else m
            m = m.half() if hasattr(m, 'half') and isinstance(x, torch.Tensor) and x.dtype is torch.float16 else m
            try:
                flops = _gflops(m, x)
            except Exception:
                flops = 0
            try:
                _step(m, x, clock)  # warm-up: lazy init, allocator and cudnn autotune stay out of the timing
                tf, tb = 0.0, 0.0
                for _ in range(n):
                    y, f, b = _step(m, x, clock)
                    tf += f / n  # ms per op forward
                    tb += b / n  # ms per op backward
                mem = torch.cuda.memory_reserved() / 1E9 if torch.cuda.is_available() else 0  # (GB)
                s_in, s_out = (tuple(v.shape) if isinstance(v, torch.Tensor) else 'list' for v in (x, y))
                p = sum(v.numel() for v in m.parameters()) if isinstance(m, nn.Module) else 0
                print(f'{p:12}{flops:12.4g}{mem:>14.3f}{tf:14.4g}{tb:14.4g}{str(s_in):>24s}{str(s_out):>24s}')
                results.append([p, flops, mem, tf, tb, s_in, s_out])
            except Exception as e:
                print(e)
                results.append(None)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return results


def _layer_table(model):
    print(f"{'layer':>5} {'name':>40} {'gradient':>9} {'parameters':>12} {'shape':>20} {'mu':>10} {'sigma':>10}")
    for i, (name, p) in enumerate(model.named_parameters()):
        name = name.replace('module_list.', '')
        v = p.detach().float()  # plain floats: no grad-to-scalar or 1-element std warnings
        mu, sigma = float(v.mean()), float(v.std()) if v.numel() > 1 else float('nan')
        print('%5g %40s %9s %12g %20s %10.3g %10.3g' % (i, name, p.requires_grad, p.numel(), list(p.shape), mu, sigma))


def _model_gflops(model, img_size):
    """GFLOPs at img_size (int or (h, w)), measured at a stride-sized input and scaled as the seed does; None when
    it cannot be measured."""
    try:
        stride = max(int(model.stride.max()), 32) if hasattr(model, 'stride') else 32
        yaml = getattr(model, 'yaml', None)
        ch = yaml.get('ch', 3) if isinstance(yaml, dict) else 3
        img = torch.zeros((1, ch, stride, stride), device=next(model.parameters()).device)
        flops = _gflops(deepcopy(model).eval(), img)  # copy + eval: BN stats untouched, batch 1 allowed
        h, w = img_size if isinstance(img_size, (list, tuple)) else (img_size, img_size)
        return flops * h / stride * w / stride
    except Exception:
        return None


def model_info(model, verbose=False, img_size=640, *, detailed=None, imgsz=None):
    """Log 'X summary: N layers, P parameters, G gradients, F GFLOPs' and return
    ``(n_layers, n_params, n_grads, gflops)``.

    Two call forms: the seed's ``model_info(model, verbose, img_size)`` and the Ultralytics 8.x / YOLOv5 master
    keywords ``model_info(model, detailed=..., imgsz=...)``. ``detailed`` is Ultralytics' name for the seed's
    ``verbose`` (the per-parameter table) and wins when given; ``imgsz`` (int or (h, w)) wins over ``img_size``.
    Where the two contracts clash the seed's wins: ``verbose=False`` still logs the summary (Ultralytics would
    return None silently). The return value is Ultralytics' tuple (the seed returned None, so no seed caller
    breaks): ``n_layers`` counts leaf modules as Ultralytics does, while the logged line keeps the seed's count
    of all modules; ``gflops`` is 0.0 when it cannot be measured.
    """
    table = verbose if detailed is None else detailed
    size = img_size if imgsz is None else imgsz
    n_p = sum(x.numel() for x in model.parameters())
    n_g = sum(x.numel() for x in model.parameters() if x.requires_grad)
    if table:
        _layer_table(model)
    flops = _model_gflops(model, size)
    fs = '' if flops is None else ', %.1f GFLOPs' % flops
    name = Path(model.yaml_file).stem.replace('yolov5', 'YOLOv5') if hasattr(model, 'yaml_file') else 'Model'
    modules = list(model.modules())
    LOGGER.info(f'{name} summary: {len(modules)} layers, {n_p} parameters, {n_g} gradients{fs}')
    n_l = sum(1 for m in modules if not m._modules)
    return n_l, n_p, n_g, flops or 0.0
