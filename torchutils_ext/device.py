"""Device discovery and selection (seed: device_count, select_device, time_sync)."""
import os
import platform
import time

import torch

from ._log import LOGGER, file_date, git_describe


def _visible(n_physical):
    # Apply CUDA_VISIBLE_DEVICES to a raw NVML count the way the CUDA runtime does:
    # the list is cut at the first entry that is not a valid device.
    cvd = os.environ.get('CUDA_VISIBLE_DEVICES')
    if cvd is None:
        return n_physical
    k = 0
    for tok in cvd.split(','):
        tok = tok.strip()
        if tok.startswith(('GPU-', 'MIG-')) or (tok.isdigit() and int(tok) < n_physical):
            k += 1
        else:
            break
    return min(k, n_physical)


def _nvml_count():
    try:
        import pynvml  # from nvidia-ml-py (or the older pynvml package)
        pynvml.nvmlInit()
        try:
            return _visible(int(pynvml.nvmlDeviceGetCount()))
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return None


def _torch_cuda_built():
    return bool(torch.version.cuda or getattr(torch.version, 'hip', None))


def device_count():
    """Number of visible CUDA devices (int), 0 on any failure. Needs no nvidia-smi and works on any OS.

    A CUDA build of torch answers through NVML without initialising CUDA (fork stays safe) and honours
    CUDA_VISIBLE_DEVICES; a CPU build asks NVML through nvidia-ml-py when it is installed.
    """
    try:
        if _torch_cuda_built():
            return int(torch.cuda.device_count())
    except Exception:
        pass
    n = _nvml_count()
    return n if n is not None else 0


def _parse(device):
    # -> 'cpu' | 'mps' | '' (auto) | list of GPU index strings. Raises ValueError, touches nothing.
    if device is None:
        return ''
    if isinstance(device, torch.device):
        device = str(device)
    if isinstance(device, (list, tuple)):
        device = ','.join(str(d) for d in device)
    s = str(device).strip().lower().replace('cuda:', '')
    if s in ('', 'none'):
        return ''
    if s in ('cpu', 'mps'):
        return s
    if s == 'cuda':
        s = '0'
    toks = [t.strip() for t in s.split(',')]
    if not all(t.isdigit() for t in toks) or len(set(int(t) for t in toks)) != len(toks):
        raise ValueError(f"Invalid CUDA '--device {device}' requested: expected 'cpu', 'mps' or comma-separated "
                         f"non-negative distinct GPU indices such as '0' or '0,1'")
    return [str(int(t)) for t in toks]


def select_device(device='', batch_size=0, newline=True, *, batch=None, verbose=True):
    """Pick the torch.device for ``device`` (None, 'cpu', 'mps', 0, '0', '0,1', 'cuda:1', ...) and log it.

    As the seed: a GPU request sets CUDA_VISIBLE_DEVICES and returns cuda:0. Bad input raises ValueError
    and leaves os.environ as it was. Ultralytics' keywords: ``batch`` (8.0-8.3's name for the seed's
    ``batch_size``) and ``verbose=False`` (skips the log line). Ultralytics 8.4's
    ``select_device(device, newline, verbose)`` clashes with the seed in the second position and in
    ``newline``'s default: the seed's wins.
    """
    if batch is not None:
        if batch_size not in (0, batch):
            raise TypeError(f'select_device got batch_size={batch_size} and batch={batch}: pass one of them')
        batch_size = batch
    s = f'YOLOv5 🚀 {git_describe() or file_date()} Python-{platform.python_version()} torch-{torch.__version__} '
    req = _parse(device)
    cpu, mps = req == 'cpu', req == 'mps'
    gpus = req if isinstance(req, list) else []
    if len(gpus) > 1 and batch_size > 0 and batch_size % len(gpus):
        raise ValueError(f'batch-size {batch_size} not multiple of GPU count {len(gpus)}')

    if cpu or mps:
        os.environ['CUDA_VISIBLE_DEVICES'] = '-1'  # force torch.cuda.is_available() = False
    elif gpus:
        # CUDA_VISIBLE_DEVICES must be set before CUDA is queried so it takes effect; undo it if the check fails
        old = os.environ.get('CUDA_VISIBLE_DEVICES')
        os.environ['CUDA_VISIBLE_DEVICES'] = ','.join(gpus)
        problem = None
        if not torch.cuda.is_available():
            problem = 'CUDA is not available (CPU-only torch build, no driver, or no such GPU)'
        elif torch.cuda.device_count() < len(gpus):
            problem = f'only {torch.cuda.device_count()} of the requested GPU(s) {",".join(gpus)} exist'
        if problem:
            if old is None:
                os.environ.pop('CUDA_VISIBLE_DEVICES', None)
            else:
                os.environ['CUDA_VISIBLE_DEVICES'] = old
            raise ValueError(f"Invalid CUDA '--device {device}' requested: {problem}. "
                             f"Use '--device cpu' or pass valid CUDA device(s)")

    if not (cpu or mps) and torch.cuda.is_available():  # prefer GPU if available
        devices = gpus or ['0']
        space = ' ' * (len(s) + 1)
        for i, d in enumerate(devices):
            p = torch.cuda.get_device_properties(i)
            s += f"{'' if i == 0 else space}CUDA:{d} ({p.name}, {p.total_memory / (1 << 20):.0f}MiB)\n"
        arg = 'cuda:0'
    elif mps and torch.backends.mps.is_available():
        s += 'MPS\n'
        arg = 'mps'
    else:
        if mps:
            LOGGER.warning('WARNING ⚠️ MPS requested but torch.backends.mps.is_available() is False, using CPU')
        s += 'CPU\n'
        arg = 'cpu'

    if not newline:
        s = s.rstrip()
    if verbose:
        LOGGER.info(s)
    return torch.device(arg)


def time_sync(device=None):
    """Wall time (``time.time()``, as the seed) after waiting for queued CUDA work.

    ``device`` (Ultralytics' keyword): a CPU/MPS device skips the wait; a CUDA device waits for that device
    only; None waits for the current CUDA device, as the seed does.
    """
    if device is not None and not isinstance(device, torch.device):
        device = torch.device(device)
    if (device is None or device.type == 'cuda') and torch.cuda.is_available():
        torch.cuda.synchronize(device)
    return time.time()
