"""Ultralytics 8.x: their ``ModelEMA.update`` and ``BaseModel.fuse`` against what ``enable_for_ultralytics`` puts
in their place, on their yaml models (default yolo11 n/s/m/l; ``--models`` picks Ultralytics names from its
list). Timed interleaved, as the other rows.

- EMA: each implementation gets its own model copy and EMA built at ``updates=U0`` (the decay of a long run),
  the model then moves to a "trained" state; every timed call is one ``update(model)`` after a cache flush.
  Checked against the float64 closed form. Rows: theirs (``_foreach_lerp_`` over cached pairs), our
  ``UltralyticsEMA`` (mode 'lerp', what the integration installs) and our ``ModelEMA`` in mode 'yolov5'.
- Fuse: every timed call fuses a fresh copy (copied untimed) with ``verbose=False`` (``verbose=True`` adds their
  FLOPs count, the same for both). Checked: the same module structure as theirs and the output within 1e-5 of
  the unfused model in float64.
"""
import contextlib
import functools
from copy import deepcopy

import pytest
import torch

import bench_ours as ours
import harness
from bench_checks import ema_err, flatten_outputs, rel_err

UL_SIZES = ['yolo11n', 'yolo11s', 'yolo11m', 'yolo11l']
U0 = 20000
LIMIT = 'limit: one dst.add_(src) over the same bytes'


def pytest_generate_tests(metafunc):
    if 'ul_model' in metafunc.fixturenames:
        opt = metafunc.config.getoption('--models')
        names = [m for m in (opt or '').split(',') if m.strip().startswith('yolo')]
        metafunc.parametrize('ul_model', names or UL_SIZES)


@pytest.fixture
def ul():
    try:
        from torchutils_ext import _ultralytics_fuse, ultralytics
        from ultralytics.nn import tasks
        from ultralytics.utils import torch_utils
    except Exception as e:
        pytest.skip(f'ultralytics not importable: {type(e).__name__}: {e}')
    return tasks, torch_utils, ultralytics, _ultralytics_fuse


def _float_state(module):
    return {k: v for k, v in module.state_dict().items() if v.dtype.is_floating_point}


def _ema_rows(ul_mod, device):
    tasks, tu, ours_ul, _ = ul_mod
    rows = [('ultralytics ModelEMA.update (foreach lerp, cached pairs)', 'peer', None, tu.ModelEMA)]
    for label, backend, why in ours.backends('ema_update_', device):
        rows.append((f'ours UltralyticsEMA, lerp ({label})', 'ours', backend, backend and ours_ul.UltralyticsEMA))
        rows.append((f'ours ModelEMA, yolov5 mode ({label})', 'ours', backend,
                     backend and functools.partial(ours.tx.ModelEMA, mode='yolov5')))
    return rows


def test_ultralytics_ema(ul, ul_model, cfg, report, flusher, build):
    base = build(ul_model)
    gen = torch.Generator().manual_seed(1)
    v0 = {k: v.clone() for k, v in _float_state(base).items()}
    trained = {k: v + 0.05 * torch.randn(v.shape, generator=gen).to(v) for k, v in v0.items()}
    nbytes = sum(3 * v.numel() * 4 for v in v0.values())
    calls, built, failures = {}, {}, []
    for name, role, backend, cls in _ema_rows(ul, cfg.device):
        if cls is None:
            report.add('ul-ema', ul_model, name, role, note='not built')
            continue
        model = deepcopy(base)
        with ours.using(backend) if role == 'ours' else contextlib.nullcontext():
            ema = cls(model, decay=0.9999, tau=2000, updates=U0)
            model.load_state_dict(trained)  # in place, as an optimizer step: cached lists stay valid
            update = functools.partial(ema.update, model)
            update()
        built[name] = (role, ema)
        calls[name] = (ours.setup(role, backend, flusher), update)
    if cfg.device == 'cpu':
        dst, src = torch.zeros(nbytes // 12), torch.ones(nbytes // 12)
        calls[LIMIT] = (flusher, functools.partial(dst.add_, src))
    with ours.restoring_backend():
        timings = harness.time_interleaved(calls, cfg.device, cfg.repeats, cfg.warmup)
    if LIMIT in timings:
        report.add('ul-ema', ul_model, LIMIT, 'limit', timings[LIMIT], nbytes, None, 'ok')
    for name, (role, ema) in built.items():
        err = ema_err(_float_state(ema.ema), v0, trained, U0, ema.updates - U0, 5e-6, 1e-7, 0.0)
        check = 'ok' if err <= 1 else f'FAIL err {err:.3g}x tol'
        if err > 1:
            failures.append(f'{name}: {check}')
        report.add('ul-ema', ul_model, name, role, timings[name], nbytes, None, check)
    assert not failures, failures


def _structure(model):
    return [(n, type(m).__name__, 'forward' in m.__dict__) for n, m in model.named_modules()]


def test_ultralytics_fuse(ul, ul_model, cfg, report, build):
    tasks, _, _, ul_fuse = ul
    base = build(ul_model)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = flatten_outputs(deepcopy(base).double()(x.double()))[0]
    stock = tasks.BaseModel.__dict__['fuse']
    rows = [('ultralytics BaseModel.fuse (per layer)', 'peer', None, stock)]
    for label, backend, why in ours.backends('fold_conv_bn', cfg.device):
        rows.append((f'ours BaseModel.fuse, one batched fold ({label})', 'ours', backend, backend and ul_fuse.fuse))
    want = _structure(stock(deepcopy(base), verbose=False))
    calls, holders, failures = {}, {}, []
    for name, role, backend, fn in rows:
        if fn is None:
            report.add('ul-fuse', ul_model, name, role, note='not built')
            continue
        holder = {}

        def fresh(holder=holder):
            holder['in'] = deepcopy(base)

        def call(fn=fn, holder=holder):
            holder['out'] = fn(holder['in'], verbose=False)
        holders[name] = (role, backend, holder)
        calls[name] = (ours.setup(role, backend, fresh), call)
    with ours.restoring_backend():
        timings = harness.time_interleaved(calls, cfg.device, max(5, cfg.repeats), 2)
    for name, (role, backend, holder) in holders.items():
        m = holder['out']
        with torch.no_grad():
            err = rel_err(flatten_outputs(m(x))[0], ref)
        same = _structure(m) == want
        check = 'ok' if err <= 1e-5 and same else f"FAIL {'structure' if not same else f'output {err:.2g}'}"
        if not check.startswith('ok'):
            failures.append(f'{name}: {check}')
        report.add('ul-fuse', ul_model, name, role, timings[name], None, None, check)
    assert not failures, failures
