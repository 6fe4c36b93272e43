"""Output comparisons shared by the tests and the benchmarks (benchmarks/bench_checks.py imports them), and the
BN randomisation the real-model tests share."""
import torch
import torch.nn as nn


def rel_err(got, ref):
    """max |got - ref| / max |ref| (scale-free: conv weights and outputs span decades)."""
    return ((got.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def flatten_outputs(y):
    """Every tensor in a model's output (tensors, lists, tuples, dicts; anything else, e.g. a string, ignored)."""
    if isinstance(y, torch.Tensor):
        return [y]
    if isinstance(y, dict):
        y = list(y.values())
    if isinstance(y, (list, tuple)):
        return [t for x in y for t in flatten_outputs(x)]
    return []


def randomize_model_bn(model, seed=0):
    """Non-trivial BN statistics and affine terms, so that folding changes the weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(c, generator=g) * 0.1)
    return model
