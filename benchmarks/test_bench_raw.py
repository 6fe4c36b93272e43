"""The raw ops on lists past the last-level cache, where the thread count shows most: our compiled ema_update_
and count_zeros against torch's foreach ops and the seed's per-tensor math. 128 tensors of 256 KiB (64 Ki fp32)
per list: the EMA moves 32 MiB of EMA (read and written) and 32 MiB of model. Each row updates its own EMA list
from the same model list, after a cache flush; every row's final state is checked against the float64 closed
form, and ours in "yolov5" mode must carry the seed's bits.
"""
import pytest
import torch

import bench_ours as ours
import harness

N_TENSORS, NUMEL = 128, 1 << 16
D = 0.999
LIMIT = 'limit: one dst.add_(src) over the same bytes'


def _lists(seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(NUMEL, generator=g) for _ in range(N_TENSORS)]


def _seed_step(ema, model):
    for v, m in zip(ema, model):  # the seed's `v *= d; v += (1 - d) * msd[k]`, one tensor at a time
        v.mul_(D)
        v.add_((1 - D) * m)


def _foreach_seed_formula(ema, model):
    torch._foreach_mul_(ema, D)
    torch._foreach_add_(ema, torch._foreach_mul(model, 1 - D))


def _ema_rows():
    rows = [('seed formula per tensor (v *= d; v += (1 - d) * m)', 'seed', _seed_step),
            ('torch._foreach_lerp_', 'peer', lambda e, m: torch._foreach_lerp_(e, m, 1 - D)),
            ('torch._foreach_mul_ + _foreach_add_(alpha) (FMA)', 'peer',
             lambda e, m: (torch._foreach_mul_(e, D), torch._foreach_add_(e, m, alpha=1 - D))),
            ('foreach mul_, mul, add_ (seed formula, no FMA)', 'peer', _foreach_seed_formula)]
    for label, backend, why in ours.backends('ema_update_', 'cpu'):
        if label == 'compiled':
            op = backend and torch.ops.torchutils_ext.ema_update_
            rows.append(('ours ema_update_ (compiled)', 'ours', op and (lambda e, m, op=op: op(e, m, D)), why))
            rows.append(('ours ema_update_ lerp mode (compiled)', 'ours',
                         op and (lambda e, m, op=op: op(e, m, D, ema_mode='lerp')), why))
    return [r if len(r) == 4 else (*r, '') for r in rows]


def test_raw_ema(cfg, report, flusher):
    if cfg.device != 'cpu':
        pytest.skip('CPU rows: the CUDA table times ModelEMA.update')
    v0, model = _lists(1), _lists(2)
    nbytes = N_TENSORS * NUMEL * 12
    emas, calls = {}, {}
    for name, role, fn, why in _ema_rows():
        if fn is None:
            report.add('raw-ema', '128 x 256 KiB', name, role, note=why or 'not built')
            continue
        emas[name] = (role, [v.clone() for v in v0])
        calls[name] = (flusher, lambda fn=fn, e=emas[name][1]: fn(e, model))
    dst, src = torch.zeros(nbytes // 12), torch.ones(nbytes // 12)
    calls[LIMIT] = (flusher, lambda: dst.add_(src))
    timings = harness.time_interleaved(calls, cfg.device, cfg.repeats, cfg.warmup)
    report.add('raw-ema', '128 x 256 KiB', LIMIT, 'limit', timings[LIMIT], nbytes, None, 'ok')
    k = cfg.warmup + cfg.repeats
    want = [m.double() + D ** k * (v.double() - m.double()) for v, m in zip(v0, model)]
    seed, failures = emas[_ema_rows()[0][0]][1], []
    for name, (role, ema) in emas.items():
        # fp32: about an ulp of |v| + |m| per step; a row that skipped a step is ~1e-3 of it off
        err = max(float(((e.double() - w).abs() / (v.abs() + m.abs()).double()).max())
                  for e, w, v, m in zip(ema, want, v0, model))
        check = 'ok' if err < 2e-7 * k else f'FAIL err {err:.3g} of |v| + |m|'
        if name == 'ours ema_update_ (compiled)' and check == 'ok':
            same = all(torch.equal(a, b) for a, b in zip(ema, seed))
            check = 'ok (= seed bits)' if same else 'FAIL not the seed bits'
        if check.startswith('FAIL'):
            failures.append(f'{name}: {check}')
        report.add('raw-ema', '128 x 256 KiB', name, role, timings[name], nbytes, None, check)
    assert not failures, failures


def test_raw_count(cfg, report, flusher):
    if cfg.device != 'cpu':
        pytest.skip('CPU rows: the CUDA table times sparsity(model)')
    ts = _lists(3)
    g = torch.Generator().manual_seed(4)
    for t in ts:
        t[torch.rand(NUMEL, generator=g) < 0.3] = 0.0
    zeros = sum(int((t == 0).sum()) for t in ts)
    rows = [('seed per tensor ((p == 0).sum(), summed)', 'seed', lambda: sum((t == 0).sum() for t in ts)),
            ('count_nonzero per tensor, summed', 'peer',
             lambda: sum(t.numel() - torch.count_nonzero(t) for t in ts))]
    for label, backend, why in ours.backends('count_zeros', 'cpu'):
        if label == 'compiled':
            rows.append(('ours count_zeros (compiled)', 'ours',
                         backend and (lambda: torch.ops.torchutils_ext.count_zeros(ts))))
    calls, failures = {}, []
    for name, role, fn in rows:
        if fn is None:
            report.add('raw-count', '128 x 256 KiB', name, role, note='not built')
            continue
        calls[name] = (flusher, lambda fn=fn: int(fn()))  # int(): the host read every caller does
    timings = harness.time_interleaved(calls, cfg.device, cfg.repeats, cfg.warmup)
    for name, role, fn in rows:
        if fn is None:
            continue
        got = int(fn())
        check = 'ok' if got == zeros else f'FAIL counted {got}, want {zeros}'
        if got != zeros:
            failures.append(f'{name}: {check}')
        report.add('raw-count', '128 x 256 KiB', name, role, timings[name], N_TENSORS * NUMEL * 4, None, check)
    assert 0.2 < zeros / (N_TENSORS * NUMEL) < 0.4
    assert not failures, failures
