"""Conv+BN fusion of a whole YOLO-shaped model: seed per layer vs torch per layer vs ours.

Every timed call fuses a fresh copy of the model (copied untimed), the way YOLOv5's Model.fuse() runs:
per-layer rows replace `m.conv` with the fused conv, drop `m.bn` and switch to `forward_fuse`; our
`fuse_model` does the same for all pairs in one batched call. Checks: every fused weight/bias against a
float64 fold, and the fused model's output against the unfused model run in float64.
"""
import contextlib
from copy import deepcopy

import torch

import bench_ours as ours
import harness
import seed_ref as S
from bench_checks import flatten_outputs, fused_reference, rel_err

W_TOL = 1e-5  # the target: fused outputs within 1e-5 relative of the float64 fold
OUT_TOL = 1e-4  # whole-model output vs float64 unfused forward (fp32 through ~60 conv layers)


def _impls(device):
    """[(row name, role, backend, why-not-run, fn(model) or None)]"""
    per_layer = lambda f: (lambda m: S.fuse_model_per_layer(m, f))  # noqa: E731
    rows = [('seed fuse_conv_and_bn (diag+mm) per layer', 'seed', 'torch', '', per_layer(S.seed_fuse_conv_and_bn)),
            ('torch fuse_conv_bn_eval per layer', 'peer', 'torch', '', per_layer(S.torch_fuse_conv_bn_eval)),
            ('pure-torch in-place broadcast fold per layer', 'peer', 'torch', '', per_layer(S.inplace_broadcast_fold))]
    for label, backend, why in ours.backends('fold_conv_bn', device):
        run = backend is not None
        rows.append((f'ours fuse_conv_and_bn per layer ({label})', 'ours', backend, why,
                     run and per_layer(ours.tx.fuse_conv_and_bn)))
        rows.append((f'ours fuse_model, one call ({label})', 'ours', backend, why, run and ours.tx.fuse_model))
    return rows


def _row(fn, role, backend, base):
    """(setup, call, holder) for one row: setup() makes a fresh unfused copy (untimed; for our rows it also
    selects our backend), call() fuses it; holder['m'] is the model of the last call. One untimed call proves
    the row runs."""
    holder = {}

    def fresh():
        holder['m'] = deepcopy(base)

    def call():
        fn(holder['m'])

    fresh()
    with ours.using(backend) if role == 'ours' else contextlib.nullcontext():
        call()
    return ours.setup(role, backend, fresh), call, holder


def test_fuse(model_name, cfg, report, build):
    base = build(model_name)
    names = [n for n, m in base.named_modules() if m in set(S.conv_blocks(base))]
    ref = {n: fused_reference(base.get_submodule(n)) for n in names}
    nbytes = sum(2 * base.get_submodule(n).conv.weight.nbytes for n in names)  # read + write every weight
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2)).to(cfg.device)
    with torch.no_grad():
        y_ref = flatten_outputs(deepcopy(base).double()(x.double()))
    failures, rows, calls = [], {}, {}
    for name, role, backend, why, fn in _impls(cfg.device):
        if not fn:
            report.add('fuse', model_name, name, role, note=why or 'not available')
            continue
        try:
            setup, call, holder = _row(fn, role, backend, base)
        except Exception as e:
            msg = str(e).splitlines()[0][:100] if str(e) else ''
            report.add('fuse', model_name, name, role, check=f'FAIL {type(e).__name__}', note=msg)
            failures.append(f'{name}: {type(e).__name__}: {msg}')
            continue
        rows[name], calls[name] = (role, holder), (setup, call)
    with ours.restoring_backend():
        timings = harness.time_interleaved(calls, cfg.device, cfg.repeats, cfg.warmup)

    for name, (role, holder) in rows.items():
        fused = holder.pop('m')
        w_err = max(max(rel_err(fused.get_submodule(n).conv.weight, ref[n][0]),
                        rel_err(fused.get_submodule(n).conv.bias, ref[n][1])) for n in names)
        left = [n for n in names if hasattr(fused.get_submodule(n), 'bn')]
        # TF32 off: cuDNN convs default to TF32 on Ampere+, ~3e-4 off the float64 output for any fuse (or none)
        with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            o_err = max(rel_err(a, b) for a, b in zip(flatten_outputs(fused(x)), y_ref))
        bad = [s for s, c in ((f'weights {w_err:.2g}', w_err > W_TOL), (f'output {o_err:.2g}', o_err > OUT_TOL),
                              (f'{len(left)} BN left', bool(left))) if c]
        check = 'ok' if not bad else 'FAIL ' + ', '.join(bad)
        if bad:
            failures.append(f'{name}: {check}')
        report.add('fuse', model_name, name, role, timings[name], nbytes, None, check)
        del fused
    assert len(names) > 0
    assert not failures, failures
