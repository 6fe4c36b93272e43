"""Correctness checks that every benchmarked implementation must pass (a fast wrong answer fails the run)."""
import math

import torch
from model_checks import flatten_outputs, rel_err  # tests/, shared with the tests

__all__ = ['ema_decay_product', 'ema_err', 'fused_reference', 'flatten_outputs', 'rel_err']


def ema_decay_product(updates0, n, decay=0.9999, tau=2000):
    """P = prod of the seed's decays over updates updates0+1 .. updates0+n (float64)."""
    p = 1.0
    for k in range(updates0 + 1, updates0 + n + 1):
        p *= decay * (1 - math.exp(-k / tau))
    return p


def ema_err(got, v0, m, updates0, n, rtol, atol, inc_rtol=0.0):
    """Worst |got - ref| / allowed over all entries (<= 1 passes), against the float64 closed form of n updates
    of `v = d v + (1-d) m` with m held fixed: ref = P v0 + (1-P) m.

    allowed = atol + rtol |ref| + inc_rtol (1-P) |m|: the last term admits rounding the increment (1-d) m to
    the model's dtype, which the seed formula does for a bf16 model (its product is a bf16 tensor)."""
    p = ema_decay_product(updates0, n)
    worst = 0.0
    for k in v0:
        v, mk = v0[k].double(), m[k].double()
        ref = p * v + (1 - p) * mk
        allowed = atol + rtol * ref.abs() + inc_rtol * (1 - p) * mk.abs()
        worst = max(worst, ((got[k].double().to(ref.device) - ref).abs() / allowed).max().item())
    return worst


def fused_reference(block):
    """Float64 fold of one Conv block (conv without bias + BN): the weight and bias any fuse must produce."""
    conv, bn = block.conv, block.bn
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    w = conv.weight.double() * scale.view(-1, *([1] * (conv.weight.dim() - 1)))
    b = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
    return w, (b - bn.running_mean.double()) * scale + bn.bias.double()
