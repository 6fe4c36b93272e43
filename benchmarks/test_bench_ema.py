"""EMA update: seed vs pure-torch peers vs third-party vs ours, fp32 model and bf16 model with fp32 EMA.

Each implementation gets its own model copy, builds its EMA from it at `updates=U0` (decay ~0.99986: the
regime of a long run), then the model is moved to a "trained" state (in-place copy, as an optimizer step
would) and stays there; every timed call is one `update(model)` after an untimed cache flush. The final
EMA state is checked against the float64 closed form, so wrong decay, wrong direction or a skipped tensor
fails; fp32 rows also say whether they are bit-identical to the seed. All rows are timed interleaved, with
a same-bytes `add_` as the measured bandwidth limit of this traffic (CPU), and read-only passes over the model's
bytes: the NaN/Inf guard must read the whole model before it writes anything, so its floor is the unguarded
update plus the fastest of those passes (the guarded rows' "x floor").
"""
import contextlib
import functools
from copy import deepcopy

import pytest
import torch

import bench_ours as ours
import harness
import seed_ref as S
from bench_checks import ema_err

U0 = 20000
LIMIT = 'limit: one dst.add_(src) over the same bytes'
# Read-only passes over the model's bytes after the same flush (role 'read'): the guard's extra traffic.
READS = {'read: one src.amax() over the model bytes': lambda src: src.amax,
         'read: one src.sum() over the model bytes': lambda src: src.sum}
SEED_FORMULA_PEER = 'foreach mul, mul_, add_, cached lists (seed formula, no FMA)'
# (rtol, atol, inc_rtol): fp32 math is ~1 ulp per step; in the mixed case the seed (and Ultralytics) round
# the increment (1-d)*m to bf16 (2^-8 relative), which inc_rtol admits and nothing else.
TOL = {'fp32': (5e-6, 1e-7, 0.0), 'mixed': (5e-6, 1e-7, 2.0 ** -8)}


def _float_state(module):
    return {k: v for k, v in module.state_dict().items() if v.dtype.is_floating_point}


def _impls(case, device):
    rows = [('seed ModelEMA (state_dict each call)', 'seed', S.SeedModelEMA, None),
            ('timm-style foreach lerp (state_dict each call)', 'peer', S.TimmStyleEMA, None),
            ('foreach lerp, cached lists', 'peer', S.CachedForeachLerpEMA, None),
            ('foreach mul+add, cached lists', 'peer', S.CachedForeachAxpbyEMA, None),
            (SEED_FORMULA_PEER, 'peer', S.CachedForeachSeedFormulaEMA, None)]
    if case == 'mixed':
        rows.append(('foreach upcast+lerp, cached lists', 'peer', S.CachedForeachUpcastLerpEMA, None))
    for name, cls, why in S.third_party_emas():
        rows.append((name, 'peer', cls, why))
    for label, backend, why in ours.backends('ema_update_', device):
        rows.append((f'ours ModelEMA ({label})', 'ours', backend and ours.tx.ModelEMA, why))
    for label, backend, why in ours.backends('ema_update_', device):  # the NaN/Inf guard's cost
        guarded = backend and functools.partial(ours.tx.ModelEMA, skip_nonfinite=True)
        rows.append((f'ours ModelEMA skip_nonfinite ({label})', 'ours', guarded, why))
    return rows


def _build(cls, role, backend, base, trained, mdtype):
    """This implementation's model copy and EMA (built at updates=U0), after one untimed update that proves
    it runs. Returns (ema, update) where update() is the timed call, run under our backend when ours."""
    model = deepcopy(base)
    ema = cls(model, decay=0.9999, tau=2000, updates=U0)
    if mdtype != torch.float32:
        model.to(mdtype)  # after the EMA exists, as bf16 training would: replaces the model's tensors
    model.load_state_dict(trained)  # in-place copy: cached lists stay valid
    update = lambda: ema.update(model)  # noqa: E731  (ours: the backend is selected in the untimed setup)
    with ours.using(backend) if role == 'ours' else contextlib.nullcontext():
        update()
    return ema, update


def _limit_row(nbytes, mdtype):
    """One dst.add_(src) pair moving the EMA's bytes: what this machine does with that traffic after the same
    flush (the 256 MiB roofline does not pay the write-back of the flushed, dirty last-level cache)."""
    n = nbytes // (8 + mdtype.itemsize)
    dst, src = torch.zeros(n), torch.ones(n, dtype=mdtype)
    return lambda: dst.add_(src)


@pytest.mark.parametrize('case', ['fp32', 'mixed'])
def test_ema(case, model_name, cfg, report, flusher, build):
    bench = 'ema' if case == 'fp32' else 'ema-mixed'
    base = build(model_name)
    gen = torch.Generator().manual_seed(1)
    v0 = {k: v.clone() for k, v in _float_state(base).items()}
    trained = {k: v + 0.05 * torch.randn(v.shape, generator=gen).to(v) for k, v in v0.items()}
    mdtype = torch.bfloat16 if case == 'mixed' else torch.float32
    m_ref = {k: v.to(mdtype) for k, v in trained.items()}  # what the model really holds
    nbytes = sum(2 * v.numel() * 4 + v.numel() * m_ref[k].element_size() for k, v in v0.items())
    tol = TOL[case]
    seed_state, failures, built, calls = None, [], {}, {}

    for name, role, cls, why in _impls(case, cfg.device):
        if cls is None:
            report.add(bench, model_name, name, role, note=why or 'not available')
            continue
        try:
            backend = 'ext' if name.endswith('(compiled)') else 'torch'
            with ours.using(backend) if role == 'ours' else contextlib.nullcontext():
                ema, update = _build(cls, role, backend, base, trained, mdtype)
        except Exception as e:
            msg = str(e).splitlines()[0][:100] if str(e) else ''
            if role == 'peer' and case == 'mixed' and isinstance(e, RuntimeError):
                report.add(bench, model_name, name, role, check='unsupported', note=msg)  # _foreach_lerp_
            else:
                report.add(bench, model_name, name, role, check=f'FAIL {type(e).__name__}', note=msg)
                failures.append(f'{name}: {type(e).__name__}: {msg}')
            continue
        built[name] = (role, backend, ema, update)
        calls[name] = (ours.setup(role, backend, flusher), update)
    model_bytes = sum(v.numel() * v.element_size() for v in m_ref.values())
    if cfg.device == 'cpu':
        calls[LIMIT] = (flusher, _limit_row(nbytes, mdtype))
        src = torch.ones(model_bytes // mdtype.itemsize, dtype=mdtype)
        calls.update({name: (flusher, make(src)) for name, make in READS.items()})
    with ours.restoring_backend():
        timings = harness.time_interleaved(calls, cfg.device, cfg.repeats, cfg.warmup)
    if LIMIT in timings:
        report.add(bench, model_name, LIMIT, 'limit', timings[LIMIT], nbytes, None, 'ok')
    for name in READS:
        if name in timings:
            report.add(bench, model_name, name, 'read', timings[name], model_bytes, None, 'ok')

    for name, (role, backend, ema, update) in built.items():
        with ours.using(backend) if role == 'ours' else contextlib.nullcontext():
            launches = harness.count_launches(update, cfg.device)
        got = _float_state(ema.ema)
        err = ema_err(got, v0, m_ref, U0, ema.updates - U0, *tol)
        check = 'ok' if err <= 1 else f'FAIL err {err:.3g}x tol'
        if err > 1:
            failures.append(f'{name}: {check}')
        if case == 'fp32' and check == 'ok' and cfg.device == 'cpu':
            if role == 'seed':
                seed_state = {k: v.clone() for k, v in got.items()}
            elif seed_state is not None:
                same = all(torch.equal(got[k], seed_state[k]) for k in got)
                check += ' (= seed bits)' if same else ''
                if role == 'ours' and not same:  # our default mode promises the seed's bits: a claim, checked
                    check = 'FAIL not the seed bits'
                    failures.append(f'{name}: fp32 EMA differs from the seed in some bits')
        report.add(bench, model_name, name, role, timings[name], nbytes, launches, check)
    built.clear()

    # the check must be able to fail: a do-nothing EMA (state left at v0) has to be far outside tolerance
    noop = ema_err(v0, v0, m_ref, U0, cfg.warmup + cfg.repeats, *tol)
    assert noop > 10, f'EMA check too weak: a no-op update is only {noop:.3g}x tolerance'
    assert not failures, failures
