"""sparsity(model): seed loop vs summed count_nonzero vs ours, on a model with ~30% of conv weights zeroed.

Each call follows an untimed cache flush (the model is read from memory, as after a training epoch); rows
are timed interleaved.
Every implementation must return a 0-d tensor equal to the exact zero fraction.
"""
import contextlib

import torch
import torch.nn as nn

import bench_ours as ours
import harness
import seed_ref as S


def _impls(device):
    rows = [('seed loop ((p == 0).sum() per parameter)', 'seed', 'torch', '', S.seed_sparsity),
            ('count_nonzero per parameter, summed', 'peer', 'torch', '', S.count_nonzero_sparsity)]
    for label, backend, why in ours.backends('count_zeros', device):
        rows.append((f'ours sparsity ({label})', 'ours', backend, why, backend and ours.tx.sparsity))
    return rows


@torch.no_grad()
def _prune(model, amount=0.3):
    gen = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.weight[(torch.rand(m.weight.shape, generator=gen) < amount).to(m.weight.device)] = 0
    return model


def test_sparsity(model_name, cfg, report, flusher, build):
    model = _prune(build(model_name))
    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    zeros = sum(int((p == 0).sum()) for p in params)
    nbytes = sum(p.nbytes for p in params)
    failures, outs, calls = [], {}, {}
    for name, role, backend, why, fn in _impls(cfg.device):
        if not fn:
            report.add('sparsity', model_name, name, role, note=why or 'not available')
            continue

        def call(fn=fn):
            return fn(model).item()  # .item() inside the timed call: the host read every caller does

        try:
            with ours.using(backend) if role == 'ours' else contextlib.nullcontext():
                outs[name] = (role, fn(model))
        except Exception as e:
            msg = str(e).splitlines()[0][:100] if str(e) else ''
            report.add('sparsity', model_name, name, role, check=f'FAIL {type(e).__name__}', note=msg)
            failures.append(f'{name}: {type(e).__name__}: {msg}')
            continue
        calls[name] = (ours.setup(role, backend, flusher), call)  # ours: backend selected untimed
    with ours.restoring_backend():
        timings = harness.time_interleaved(calls, cfg.device, cfg.repeats, cfg.warmup)
    want = torch.tensor(zeros) / total  # the seed's value and dtype: an int64 count over an int
    for name, (role, out) in outs.items():
        ok = isinstance(out, torch.Tensor) and out.dim() == 0 and out.dtype == want.dtype and out.item() == want.item()
        check = 'ok' if ok else f'FAIL got {out!r}, want {want.item():.9f}'
        if ok and role == 'ours':  # the count itself, exact: the fraction's float32 rounding hides a few zeros
            backend = 'ext' if name.endswith('(compiled)') else 'torch'
            with ours.using(backend):
                got = int(ours.tx._ops.count_zeros([p.detach() for p in params]))
            ok, check = got == zeros, ('ok' if got == zeros else f'FAIL counted {got} zeros, want {zeros}')
        if not ok:
            failures.append(f'{name}: {check}')
        report.add('sparsity', model_name, name, role, timings[name], nbytes, None, check)
    assert 0.2 < zeros / total < 0.4  # the check compares a non-trivial count
    assert not failures, failures
