"""Output comparisons shared by the tests and the benchmarks (benchmarks/bench_checks.py imports them)."""
import torch


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
