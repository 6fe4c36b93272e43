"""The compiled CPU kernels on torch's threads: every op gives the same bits at 1, 2 and 3 threads, and each
kernel really ran on torch.get_num_threads() threads (no timing: the kernels record which threads ran them).

Each thread count runs in a process of its own (cpu_threads_cases.py), set before any parallel work, as every
torch build honours it (the native thread pool ignores a later torch.set_num_threads).
"""
import os
import subprocess
import sys

import pytest
import torch

import cpu_threads_cases as cases
import torchutils_ext as tx
from torchutils_ext import _ops

pytestmark = pytest.mark.skipif(not _ops.COMPILED, reason=f'compiled ops not built: {_ops._LOAD_ERROR}')
THREADS = (1, 2, 3)
HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    out = {}
    for n in THREADS:
        path = tmp_path_factory.mktemp('threads') / f'{n}.pt'
        r = subprocess.run([sys.executable, os.path.join(HERE, 'cpu_threads_cases.py'), str(n), str(path)],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f'{n} threads: {r.stderr[-3000:]}'
        out[n] = torch.load(path, weights_only=False)
    return out


def _bits(x):
    """x as nested lists of integer views (NaN payloads and -0.0 compared too)."""
    if isinstance(x, torch.Tensor):
        ints = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}[x.element_size()]
        return x.contiguous().view(ints) if x.is_floating_point() else x
    if isinstance(x, dict):
        return {k: _bits(v) for k, v in x.items()}
    return [_bits(v) for v in x]


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride() and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))


def test_same_bits_at_every_thread_count(runs):
    keys = [k for k in runs[1] if k not in ('threads', 'omp_runtimes', 'threads_used')]
    assert len(keys) == 32 + 8 + 6  # every EMA mode and dtype pair, the guard cases, count, folds, model calls
    for n in THREADS[1:]:
        differ = [k for k in keys if not _same(_bits(runs[1][k]), _bits(runs[n][k]))]
        assert not differ, f'{n} threads give other bits than 1 thread: {differ}'


def test_results_at_one_thread_are_right(runs):
    """What the runs agree on is right: EMA "yolov5" mode and folds equal the pure-torch path's bits (fp64 folds:
    within 2^-50, README), the guard's flag and counter, the exact zero count."""
    r = runs[1]
    with tx.use_backend('torch'):
        for edt in cases.DTYPES:
            for mdt in cases.DTYPES:
                ema, model = cases.ema_inputs(edt, mdt, seed=cases.DTYPES.index(edt) * 4 + cases.DTYPES.index(mdt))
                _ops.ema_update_(ema, model, 0.9993)
                assert _same(_bits(ema), _bits(r[f'ema yolov5 {edt} {mdt}'])), (edt, mdt)
        w, b = _ops.fold_conv_bn(*cases.fold_inputs())
    for got, want in zip(r['fold'][0] + r['fold'][1], w + b):
        # fp64: a scale may be one ulp off torch's (its double sqrt), moving a bias by 2^-52 of its terms, |bn_bias| <= 1
        tol = 2.0 ** -50 if want.dtype == torch.float64 else 0.0
        assert ((got.double() - want.double()).abs() <= tol * (want.double().abs() + 1)).all()
    assert _same(_bits(r['fold'][0]), _bits(r['fold_']))
    for case, where in cases.GUARD_CASES.items():
        for mdt in (torch.float32, torch.bfloat16):
            ema, guard = r[f'guard {case} {mdt}']
            start, _ = cases.guard_inputs(case, mdt)
            assert guard.tolist() == ([0, 0] if where is None else [1, 1]), (case, mdt)
            assert _same(_bits(ema), _bits(start)) == (where is not None), (case, mdt)
    ts = cases.count_inputs()
    assert int(r['count']) == sum(int((t == 0).sum()) for t in ts)


def test_kernels_run_on_torch_threads(runs):
    """Fails when the build loses its parallel backend: compiled without torch's OpenMP flags, every kernel runs
    on one thread whatever torch.get_num_threads() says; with a second OpenMP runtime, torch.set_num_threads
    would not reach our kernels."""
    config = torch.__config__.parallel_info()
    built = tx.backend_info()['build']['cpu_parallel']
    if 'ATen parallel backend: OpenMP' in config:
        assert built.startswith('OpenMP'), f'torch runs OpenMP but the kernels were built {built!r}'
    for n in THREADS:
        assert runs[n]['threads'] == n
        wrong = {k: v for k, v in runs[n]['threads_used'].items() if set(v.values()) != {n}}
        assert not wrong, f'at torch.get_num_threads() == {n}, kernels ran on other thread counts: {wrong}'
        if sys.platform.startswith('linux') and 'OpenMP' in config:
            assert len(runs[n]['omp_runtimes']) == 1, f"OpenMP runtimes loaded: {runs[n]['omp_runtimes']}"
