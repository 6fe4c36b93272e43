"""Whether the CUDA kernels were built for a given GPU. A build without code for the GPU fails every launch with
"no kernel image is available"; asked once per device, before the first launch, this turns that into one
warning and the pure-torch path (or a clear error when the compiled ops were demanded)."""
from __future__ import annotations

import warnings

import torch

_CHECKED: dict = {}


def parse_arch_list(text: str | None):
    """[(major, minor, ptx)] from a TORCH_CUDA_ARCH_LIST such as '8.0;9.0+PTX' (None: unknown, assume served)."""
    if not text:
        return None
    out = []
    for tok in text.replace(',', ';').replace(' ', ';').split(';'):
        tok = tok.strip()
        if not tok:
            continue
        ptx = tok.endswith('+PTX')
        num = tok[:-4] if ptx else tok
        try:
            major, minor = num.rstrip('af').split('.')
            out.append((int(major), int(minor), ptx))
        except ValueError:
            return None  # a named arch ('Ampere'): do not second-guess the build
    return out


def serves(archs, capability) -> bool:
    """A cubin for sm_Mm runs on devices of major M with minor >= m; PTX for compute_Mm JIT-compiles on any
    device of capability >= M.m."""
    if archs is None:
        return True
    major, minor = capability
    return any((M == major and m <= minor) or (ptx and (M, m) <= (major, minor)) for M, m, ptx in archs)


def reason_not_served(device: torch.device, arch_list: str | None, capability=None):
    """None when the build serves ``device``, else why not (warned once per device)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (index, arch_list)
    if key not in _CHECKED:
        cap = capability if capability is not None else torch.cuda.get_device_capability(index)
        why = None
        if not serves(parse_arch_list(arch_list), cap):
            why = (f'the CUDA kernels were built for compute capabilities {arch_list}, and cuda:{index} is '
                   f'{cap[0]}.{cap[1]}: rebuild with TORCH_CUDA_ARCH_LIST="{cap[0]}.{cap[1]}" (or on a machine with '
                   'that GPU) and pip install --no-build-isolation .')
            warnings.warn(f'torchutils_ext: {why} Until then the ops on this GPU take the pure-torch path.',
                          RuntimeWarning, stacklevel=4)
        _CHECKED[key] = why
    return _CHECKED[key]
