"""sparsity() and prune() as the seed, with zero counting done by one pass over all parameters."""
from __future__ import annotations

import torch
import torch.nn as nn

from ._ops import count_zeros
from ._walk import parameters_once


def _zeros(params):
    by_device = {}
    for p in params:  # count_zeros runs under no_grad, so parameters go in as they are (no .detach() each)
        by_device.setdefault(p.device, []).append(p)
    counts = [count_zeros(ts) for ts in by_device.values()]
    if not counts:
        return torch.zeros((), dtype=torch.int64)
    total = counts[0]
    for c in counts[1:]:
        total = total + c.to(total.device)
    return total


def sparsity(model):
    """Global model sparsity: the fraction of parameter elements equal to zero, as a 0-d tensor (seed type)."""
    params = parameters_once(model)  # list(model.parameters()), ~3x cheaper
    return _zeros(params) / sum(p.numel() for p in params)


def prune(model, amount=0.3, *, global_unstructured=False):
    """Prune Conv2d weights by L1 magnitude, per layer (seed) or over all layers at once. ``amount``: a fraction
    in [0, 1], or, as torch's pruning takes it, an int count of weights to zero (per layer, or in all)."""
    import torch.nn.utils.prune as tprune

    if isinstance(amount, bool) or not isinstance(amount, (int, float)):
        raise TypeError(f'amount must be a float fraction or an int count, got {type(amount).__name__}')
    if isinstance(amount, int) and amount < 0:
        raise ValueError(f'amount as a count must be >= 0, got {amount}')
    if isinstance(amount, float) and not 0.0 <= amount <= 1.0:
        raise ValueError(f'amount as a fraction must be in [0, 1], got {amount}')
    print('Pruning model... ', end='')
    convs = [m for _, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if global_unstructured and convs:
        tprune.global_unstructured([(m, 'weight') for m in convs], pruning_method=tprune.L1Unstructured,
                                   amount=amount)
    else:
        for m in convs:
            tprune.l1_unstructured(m, name='weight', amount=amount)
    for m in convs:
        tprune.remove(m, 'weight')  # make permanent
    print(' %.3g global sparsity' % sparsity(model))
