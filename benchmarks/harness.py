"""Timing, roofline and machine description for the benchmarks (no pytest here).

Implementations are timed interleaved (round-robin, see time_interleaved). CPU: `time.perf_counter` around
the call only; an untimed `setup()` (cache flush, fresh model copy) runs before every call. CUDA: CUDA
events; `setup()` is followed by a synchronize *before* the start event, so the launch overhead of the timed
call is counted and the flush is not.
"""
import datetime
import platform
import statistics
import time
import warnings

import torch

FLUSH_BYTES = {'cpu': 128 << 20, 'cuda': 256 << 20}  # CPU: > L3 of this VM; CUDA: > 5x H100/H200 L2 (50 MB)
ROOF_BYTES = 256 << 20  # per tensor of dst.add_(src)


class Flusher:
    """Writes a buffer bigger than the last-level cache, so the next call starts cold (as in training)."""

    def __init__(self, device):
        self.buf = torch.empty(FLUSH_BYTES[torch.device(device).type] // 4, dtype=torch.float32, device=device)
        self.k = 0

    def __call__(self):
        self.k += 1
        self.buf.fill_(float(self.k))  # a new value each time: no write-elision tricks


def sync(device):
    if torch.device(device).type == 'cuda':
        torch.cuda.synchronize()


def _stats(times):
    return {'median_ms': statistics.median(times), 'min_ms': min(times), 'max_ms': max(times), 'n': len(times)}


def _time_once(fn, device):
    if torch.device(device).type == 'cuda':
        torch.cuda.synchronize()  # outside the timed region: setup is done, the queue is empty
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        return s.elapsed_time(e)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def time_interleaved(calls, device='cpu', repeats=20, warmup=3):
    """Time several implementations side by side. calls: {name: (setup or None, fn)}.

    Each round runs every entry once (setup untimed, then fn timed), starting at a different entry each round,
    so a noisy neighbour or clock drift hits all rows alike; sequential per-row loops on this shared VM gave
    ratios that swung by 30% between runs. Returns {name: ms stats}.
    """
    names = list(calls)
    samples = {n: [] for n in names}
    for r in range(warmup + repeats):
        k = r % len(names) if names else 0
        for n in names[k:] + names[:k]:
            setup, fn = calls[n]
            if setup:
                setup()
            t = _time_once(fn, device)
            if r >= warmup:
                samples[n].append(t)
    return {n: _stats(v) for n, v in samples.items()}


def time_fn(fn, device='cpu', repeats=20, warmup=3, setup=None):
    """Run `setup(); fn()` warmup + repeats times; time only fn(). Returns ms stats."""
    return time_interleaved({'fn': (setup, fn)}, device, repeats, warmup)['fn']


def roofline(device='cpu', repeats=20, warmup=3):
    """Memory-bandwidth limit measured like the EMA's access pattern: dst.add_(src), 2 reads + 1 write."""
    n = ROOF_BYTES // 4
    dst = torch.zeros(n, device=device)
    src = torch.ones(n, device=device)
    t = time_fn(lambda: dst.add_(src), device, repeats, warmup)
    gbs = 3 * ROOF_BYTES / (t['median_ms'] * 1e-3) / 1e9
    del dst, src
    return {'gb_per_s': gbs, 'bytes': 3 * ROOF_BYTES, **t}


def count_launches(fn, device):
    """Kernel launches of one fn() call on CUDA (torch.profiler device events); None on CPU."""
    if torch.device(device).type != 'cuda':
        return None
    from torch.profiler import ProfilerActivity, profile
    sync(device)
    with warnings.catch_warnings():  # "Profiler clears events at the end of each cycle": one cycle here
        warnings.simplefilter('ignore')
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            sync(device)
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def cpu_model():
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _commit():
    """The commit measured: $COMMIT (a copy without .git), else git's HEAD, else 'unknown'."""
    import os
    import subprocess
    if os.environ.get('COMMIT'):
        return os.environ['COMMIT']
    try:
        return subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__)), timeout=10).stdout.strip() or 'unknown'
    except Exception:
        return 'unknown'


def machine_info(device, threads):
    info = {'cpu': cpu_model(), 'cpu_count': __import__('os').cpu_count(), 'threads': threads,
            'torch': torch.__version__, 'python': platform.python_version(), 'device': str(device),
            'date': datetime.datetime.now().astimezone().isoformat(timespec='seconds'), 'commit': _commit()}
    if torch.cuda.is_available():
        info['gpu'] = torch.cuda.get_device_name(0)
        info['cuda'] = torch.version.cuda
    try:
        import torchutils_ext
        info['torchutils_ext'] = getattr(torchutils_ext, '__version__', '?')
        info['backend_info'] = torchutils_ext.backend_info()
    except Exception as e:  # the report still says why ours rows are missing
        info['torchutils_ext'] = f'not importable: {type(e).__name__}: {e}'
    return info
