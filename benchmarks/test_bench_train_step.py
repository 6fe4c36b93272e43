"""What a training run gains: YOLOv5 v7.0's own training step (``train_loop.py``) with the seed's ``torch_utils``
(the ``yolov5`` package's own module) and with ours, on yolov5n/s at 128 px, batch 2, synthetic images and targets.

The sides train separate copies of one model on the same batches, interleaved step by step (a different side first
each round). Per step: the training part (forward, loss, backward, clip, optimizer step) and the EMA update, each
timed to a device sync; the per-epoch calls (``update_attr``, ``model_info``, ``Model.fuse()``, ``sparsity``) are
timed apart and charged per step over an epoch of EPOCH_STEPS steps. Checked: every side's losses equal the seed's
(CPU: bit for bit), the EMA after the steps equals the seed's bits (CPU), one more update equals the seed's formula
on every device, the fused model computes the unfused EMA model, sparsity equals the seed's value.
Skipped, with the reason in the table, without the yolov5 package (TORCHUTILS_EXT_YOLOV5=1 makes that a failure).
"""
import contextlib
import os
import statistics

import pytest
import torch

import bench_ours as ours
import harness
import train_loop
from bench_checks import flatten_outputs, rel_err
from seed_oracle import seed_decay

IMGSZ, BATCH = 128, 2
EPOCH_STEPS = 500  # steps per epoch the per-epoch calls are spread over (e.g. 8000 images at batch 16)
# a step's training part swings with the machine's load far more than an op does: more rounds than the op tables
STEPS, WARMUP = 60, 5
PRECISIONS = {'fp32': ('train', None), 'bf16': ('train-bf16', torch.bfloat16)}
SEED = 'seed (yolov5 7.0 torch_utils)'
REQUIRED = os.environ.get('TORCHUTILS_EXT_YOLOV5') == '1'


def _sides(seed_tu, device):
    """[(name, role, torch_utils module or None, backend, why not)]: the seed, then ours on each backend."""
    sides = [(SEED, 'seed', seed_tu, None, '')]
    for label, backend, why in ours.backends('ema_update_', device):
        sides.append((f'ours ({label})', 'ours', ours.tx if backend else None, backend, why))
    return sides


def _float_state(module):
    return {k: v for k, v in module.state_dict().items() if v.is_floating_point()}


def _one_more_update_is_the_seed_formula(loop):
    """The seed's `v *= d; v += (1 - d) * m` from the EMA as it is now, against this side's next update."""
    before = {k: v.clone() for k, v in _float_state(loop.ema.ema).items()}
    msd = loop.model.state_dict()
    d = seed_decay(loop.ema.updates + 1)
    with torch.no_grad():
        loop.ema.update(loop.model)
    for k, v in before.items():
        v *= d
        v += (1 - d) * msd[k].detach()
    got = _float_state(loop.ema.ema)
    return [k for k in before if not torch.equal(got[k], before[k])]


def _steps(loops, batches, device, rounds, warmup):
    """Interleaved steps; {name: [(train ms, ema ms)]} after warm-up."""
    names = list(loops)
    times = {n: [] for n in names}
    for r in range(rounds):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            select, loop = loops[n]
            if select:
                select()
            t = loop.step(*batches[r % len(batches)])
            if r >= warmup:
                times[n].append(t)
    return times


@pytest.mark.parametrize('precision', list(PRECISIONS))
def test_train_step(precision, train_model, cfg, report):
    bench, amp = PRECISIONS[precision]
    try:
        seed_tu, yolo, compute_loss, root = train_loop.import_yolov5()
    except ImportError as e:
        why = f'not run: {e} (YOLOV5_CLIENT=1 bash scripts/test.sh installs it)'
        report.add(bench, train_model, SEED, 'seed', note=why)
        if REQUIRED:
            pytest.fail(why)
        pytest.skip(why)
    if amp is not None and cfg.device == 'cuda' and not torch.cuda.is_bf16_supported():
        report.add(bench, train_model, SEED, 'seed', note='not run: this GPU has no bf16')
        pytest.skip('this GPU has no bf16')
    base = train_loop.build_model(yolo, root, train_model, IMGSZ, cfg.device)
    batches = train_loop.synthetic_batches(4, BATCH, IMGSZ)
    steps, warmup = (3, 1) if cfg.quick else (STEPS, WARMUP)
    if amp is not None and cfg.device == 'cpu' and not cfg.quick and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        steps, warmup = 10, 2  # bf16 without CPU support (no AVX512-BF16/AMX): a yolov5s step takes seconds

    loops, roles = {}, {}
    for name, role, tu, backend, why in _sides(seed_tu, cfg.device):
        if tu is None:
            report.add(bench, train_model, name, role, note=why)
            continue
        with ours.using(backend) if role == 'ours' else contextlib.nullcontext():
            loops[name] = (ours.setup(role, backend), train_loop.Loop(tu, base, compute_loss, cfg.device, amp))
        roles[name] = (role, backend)
    with ours.restoring_backend():
        times = _steps(loops, batches, cfg.device, warmup + steps, warmup)
        epoch, held, calls = {}, {}, {}
        for name, (select, loop) in loops.items():
            held[name], per_epoch = train_loop.epoch_calls(loop, yolo, IMGSZ)
            for call, (setup, fn) in per_epoch.items():
                calls[f'{name}|{call}'] = (ours.setup(*roles[name], setup), fn)
        epoch_t = harness.time_interleaved(calls, cfg.device, 1 if cfg.quick else 5, 1)
        for key, t in epoch_t.items():
            name, call = key.split('|')
            epoch.setdefault(name, {})[call] = t['median_ms']

        failures = _check(loops, held, roles, cfg.device)
    _report(report, bench, train_model, loops, roles, times, epoch, failures, cfg.device)
    assert not failures, failures


def _report(report, bench, model, loops, roles, times, epoch, failures, device):
    """One row per side. Step = training part + EMA update + the per-epoch calls / EPOCH_STEPS. x seed is the median
    over rounds of seed step / this step (paired: both ran in the same round, so a burst of load hits both)."""
    totals = {n: [a + b + sum(epoch[n].values()) / EPOCH_STEPS for a, b in times[n]] for n in loops}
    seed_utils = None
    for name in loops:
        role = roles[name][0]
        utils = statistics.median(b for _, b in times[name]) + sum(epoch[name].values()) / EPOCH_STEPS
        seed_utils = utils if name == SEED else seed_utils
        total = statistics.median(totals[name])
        paired = statistics.median(s / t for s, t in zip(totals[SEED], totals[name]))
        check = 'FAIL' if any(f.startswith(name) for f in failures) else \
            'ok (losses, EMA = seed bits)' if device == 'cpu' else 'ok (losses close, EMA update = seed formula)'
        e = epoch[name]
        note = (f"per epoch: update_attr {e['update_attr']:.2f}, model_info {e['model_info']:.1f}, "
                f"fuse {e['fuse']:.1f}, sparsity {e['sparsity']:.2f} ms")
        report.add(bench, model, name, role,
                   {'median_ms': total, 'min_ms': min(totals[name]), 'max_ms': max(totals[name]),
                    'n': len(totals[name])}, check=check, note=note,
                   train_ms=statistics.median(a for a, _ in times[name]), utils_ms=utils, share=utils / total,
                   utils_vs_seed=seed_utils / utils, paired_vs_seed=paired, epoch_ms=e, epoch_steps=EPOCH_STEPS,
                   imgsz=IMGSZ, batch=BATCH)


def _check(loops, held, roles, device):
    """Failures, each starting with the side's name."""
    failures = []
    seed = loops[SEED][1]
    seed_losses = torch.stack(seed.losses).cpu()
    seed_ema = {k: v.clone() for k, v in _float_state(seed.ema.ema).items()}  # before its own extra update
    seed_updates = seed.ema.updates
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3)).to(device)
    for name, (select, loop) in loops.items():
        if select:
            select()
        losses = torch.stack(loop.losses).cpu()
        if not torch.isfinite(losses).all():
            failures.append(f'{name}: a loss is not finite')
        if device == 'cpu':  # same model, batches and ops on one thread: the same bits at every step
            if not torch.equal(losses, seed_losses):
                failures.append(f'{name}: losses differ from the seed loop\'s')
        elif not torch.allclose(losses[0], seed_losses[0], rtol=1e-4, atol=0):  # CUDA backward is not bitwise
            failures.append(f'{name}: first-step losses {losses[0].tolist()} vs {seed_losses[0].tolist()}')
        if device == 'cpu' and roles[name][0] == 'ours':
            got = _float_state(loop.ema.ema)
            if loop.ema.updates != seed_updates or any(not torch.equal(got[k], v) for k, v in seed_ema.items()):
                failures.append(f'{name}: EMA after the steps differs from the seed\'s bits')
        fused = held[name]['fused']
        bn_left = sum(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
        with torch.no_grad():
            err = max(rel_err(a, b) for a, b in zip(flatten_outputs(fused(x)), flatten_outputs(loop.ema.ema(x))))
        if bn_left or err > 1e-4:
            failures.append(f'{name}: fuse left {bn_left} BN, output {err:.2g} off the unfused EMA model')
        if float(loop.tu.sparsity(loop.ema.ema)) != float(seed.tu.sparsity(loop.ema.ema)):
            failures.append(f'{name}: sparsity differs from the seed\'s')
        wrong = _one_more_update_is_the_seed_formula(loop)
        if wrong:
            failures.append(f'{name}: an update is not the seed formula for {len(wrong)} entries, e.g. {wrong[0]}')
    return failures
