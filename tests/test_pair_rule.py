"""The EMA pair rule (which (EMA, model) dtype pairs round once, which take the seed's three steps) is defined once
in C++ (csrc/ema_update/ema_kind.h); the Python copy in _validate.py, used without the library, must equal it, and
the pure-torch twin must follow the table it is given."""
import pytest
import torch

from torchutils_ext import _ops, _validate
from torchutils_ext._ops import use_backend

ONCE = {(torch.float32, torch.float32), (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
        (torch.float64, torch.float64), (torch.float32, torch.float16), (torch.float32, torch.bfloat16)}


@pytest.mark.skipif(not _ops.COMPILED, reason='the library is not built: no C++ rule to tie to')
def test_python_copy_equals_the_kernels_rule():
    assert _ops._C.ema_pair_rule() == _validate.PYTHON_PAIR_RULE
    assert _validate.SEED_ROUNDING_PAIRS == _validate.seed_rounding_pairs(_ops._C.ema_pair_rule())


def test_rule_is_the_documented_one():
    pairs = {(getattr(torch, e), getattr(torch, m)) for e, m, once in _validate.PYTHON_PAIR_RULE if once}
    assert pairs == ONCE
    assert len(_validate.PYTHON_PAIR_RULE) == 16
    assert _validate.SEED_ROUNDING_PAIRS == {(e, m) for e in _validate.EMA_DTYPES for m in _validate.EMA_DTYPES} - ONCE


def _twin_step(edt, mdt):
    g = torch.Generator().manual_seed(3)
    e = torch.randn(4096, generator=g, dtype=torch.float64).to(edt)
    m = torch.randn(4096, generator=g, dtype=torch.float64).to(mdt)
    with use_backend('torch'):
        _ops.ema_update_([e], [m], 0.9371)
    return e


def test_twin_follows_the_table(monkeypatch):
    # a bf16 EMA of an fp32 model: three roundings by the rule; flipping the table to "once" must change bits
    edt, mdt = torch.bfloat16, torch.float32
    seed_steps = _twin_step(edt, mdt)
    monkeypatch.setattr(_validate, 'SEED_ROUNDING_PAIRS', _validate.SEED_ROUNDING_PAIRS - {(edt, mdt)})
    once = _twin_step(edt, mdt)
    assert not torch.equal(seed_steps, once)
    # and the three steps are the seed's: v * d in bf16, (1 - d) * m in fp32, the sum in fp32, stored in bf16
    g = torch.Generator().manual_seed(3)
    v = torch.randn(4096, generator=g, dtype=torch.float64).to(edt)
    m = torch.randn(4096, generator=g, dtype=torch.float64).to(mdt)
    v *= 0.9371
    v += (1 - 0.9371) * m
    assert torch.equal(seed_steps, v)
