"""Ultralytics' own trainer, stock and with ``enable_for_ultralytics``, each run in a fresh process
(``ultralytics_runs.py``): ``YOLO('yolov8n.yaml').train(...)`` for 2 epochs on a generated 16-image dataset, CPU,
one thread, offline.

- Clean runs: per-batch losses identical, validation metrics identical, the final EMA and the checkpoints
  identical in every bit (our 'lerp' mode is their ``_foreach_lerp_``'s one fused multiply-add).
- Poisoning: one NaN written into a weight right after the 3rd optimizer step and restored after that step's
  EMA update. Stock's EMA holds the NaN until ``save_model`` resyncs that tensor from the live model (its
  history gone); ours with ``skip_nonfinite=True`` stays finite and equals a run that skipped that one update
  (counter advanced), ``skipped == 1``.
- Checkpoints: last/best written by either load in both (``YOLO(path)``), same outputs; ``resume=True``
  continues from either, identically to the other side.
- DDP: Ultralytics' own hand-off (``generate_ddp_file``) to 2 gloo ranks, each running the trainer's training
  loop; every rank trains with our EMA (see ``job_ddp_worker`` for the three CUDA-only pieces replaced).
"""
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from client_packages import need

pytestmark = pytest.mark.slow
RUNNER = Path(__file__).with_name('ultralytics_runs.py')
TIMES = {}


def _run(tmp, which, job, out, *extra, env=None):
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, str(RUNNER), which, job, str(tmp / out), *extra], capture_output=True,
                       text=True, timeout=900, cwd=tmp, env={**os.environ, **(env or {})})
    TIMES[out] = time.perf_counter() - t0
    if p.returncode:
        raise AssertionError(f'{which} {job} failed (exit {p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}')
    return torch.load(tmp / out, weights_only=False)


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    need('ultralytics')
    tmp = tmp_path_factory.mktemp('ul-train')
    data = ('--data', str(tmp / 'data'))
    r = {
        'stock': _run(tmp, 'stock', 'train', 'stock.pt', *data, '--project', str(tmp / 'stock')),
        'ours': _run(tmp, 'ours', 'train', 'ours.pt', *data, '--project', str(tmp / 'ours')),
        'stock_poison': _run(tmp, 'stock', 'train', 'sp.pt', *data, '--project', str(tmp / 'sp'), '--poison', '3'),
        'ours_poison': _run(tmp, 'ours', 'train', 'op.pt', *data, '--project', str(tmp / 'op'), '--poison', '3',
                            '--skip-nonfinite'),
        'ours_skip': _run(tmp, 'ours', 'train', 'os.pt', *data, '--project', str(tmp / 'os'), '--skip-step', '3'),
    }
    for src in ('stock', 'ours'):  # each side's epoch-0 checkpoint, resumed by both
        for which in ('stock', 'ours'):
            folder = tmp / f'resume-{which}-from-{src}'
            folder.mkdir()
            ckpt = folder / 'epoch0.pt'
            ckpt.write_bytes(Path(r[src]['epoch0']).read_bytes())
            r[f'{which}_from_{src}'] = _run(tmp, which, 'train', f'{folder.name}.pt', '--resume', str(ckpt),
                                            '--project', str(folder))
    ckpts = ','.join(r[w][k] for w in ('stock', 'ours') for k in ('last', 'best'))
    r['load'] = {w: _run(tmp, w, 'load', f'load-{w}.pt', '--ckpt', ckpts) for w in ('stock', 'ours')}
    sys.stderr.write('\nUltralytics runs (whole process, s): '
                     + ', '.join(f'{k[:-3]} {v:.1f}' for k, v in TIMES.items()) + '\n')
    return r


def _assert_ema_equal(ref, got, what):
    """``got``'s final EMA equal to ``ref``'s in every bit."""
    assert ref['ema'].keys() == got['ema'].keys()
    for k, v in ref['ema'].items():
        assert torch.equal(v, got['ema'][k]), f'{what}: {k}'


def test_clean_runs_match(runs):
    stock, ours = runs['stock'], runs['ours']
    assert stock['ema_class'] == 'ModelEMA' and ours['ema_class'] == 'UltralyticsEMA' and ours['ema_mode'] == 'lerp'
    assert len(stock['batch_loss']) == 8 and stock['steps'] == ours['steps'] == 8  # 2 epochs x 4 batches
    assert stock['batch_loss'] == ours['batch_loss']  # the EMA does not feed training
    assert stock['updates'] == ours['updates'] == 8 and ours['skipped'] == 0
    _assert_ema_equal(stock, ours, 'final EMA')
    # validation runs on the EMA: the same metrics
    assert [e for e, _ in stock['metrics']] == [e for e, _ in ours['metrics']] == [0, 1, 2]
    assert stock['metrics'] == ours['metrics']
    assert all(torch.isfinite(torch.tensor(list(m.values()))).all() for _, m in ours['metrics'])


def _nonfinite(sd):
    return {k: int((~torch.isfinite(v)).sum()) for k, v in sd.items() if v.is_floating_point()
            and not torch.isfinite(v).all()}


def test_poisoned_step(runs):
    clean, sp, op, skip = runs['stock'], runs['stock_poison'], runs['ours_poison'], runs['ours_skip']
    k = 'model.0.conv.weight'
    # training is untouched: the NaN lives only between the optimizer step and the EMA update
    assert clean['batch_loss'] == sp['batch_loss'] == op['batch_loss'] == skip['batch_loss']
    # stock: poisoned until save_model's repair, which copies the live weights over that tensor's history
    assert _nonfinite(sp['ema_before_save'][0]) == {k: 1}
    assert not _nonfinite(sp['ema_after_save'][0])
    assert torch.equal(sp['ema_after_save'][0][k], sp['model_at_save'][0][k])
    assert not torch.equal(sp['ema_after_save'][0][k], clean['ema_after_save'][0][k])
    lost = (sp['ema_after_save'][0][k] - clean['ema_after_save'][0][k]).abs().max().item()
    val_loss = [m['val/box_loss'] for e, m in sp['metrics'] if e == 0]
    assert val_loss and val_loss[0] != val_loss[0], 'stock validated its NaN EMA in epoch 0'
    # ours: finite throughout, the same EMA as a run that skipped that one update, one skip counted
    assert op['ema_class'] == 'UltralyticsEMA' and op['skipped'] == 1 and op['updates'] == skip['updates'] == 8
    assert not _nonfinite(op['ema_before_save'][0]) and not _nonfinite(op['ema'])
    for a, b in zip(op['ema_before_save'] + [op['ema']], skip['ema_before_save'] + [skip['ema']]):
        assert all(torch.equal(a[n], b[n]) for n in a)
    assert op['metrics'] == skip['metrics']
    sys.stderr.write(f'\npoisoned update: stock EMA {k} had 1 NaN until save, then was resynced from the live '
                     f'model ({lost:.3g} max from the clean EMA); ours skipped it (skipped=1), equal to the '
                     'skip-that-step run\n')


def test_checkpoints_cross_load(runs):
    stock, ours = runs['load']['stock'], runs['load']['ours']
    assert stock['fuse_impl'] == 'ultralytics.nn.tasks' and ours['fuse_impl'] == 'torchutils_ext._ultralytics_fuse'
    paths = [runs[w][k] for w in ('stock', 'ours') for k in ('last', 'best')]
    for p in paths:
        assert b'torchutils_ext' not in Path(p).read_bytes(), f'{p} names our package: stock could not load it'
        s, o = stock[p], ours[p]
        assert torch.equal(s['unfused'], o['unfused'])
        assert s['bn_left'] == o['bn_left'] == 0
        for r in (s, o):
            err = ((r['fused'].double() - r['float64']).abs().max() / r['float64'].abs().max()).item()
            assert err <= 1e-5, f'{p}: fused output {err} from float64'
        assert s['predict'].shape == o['predict'].shape and len(s['predict'])
        torch.testing.assert_close(o['predict'], s['predict'], rtol=1e-5, atol=1e-4)
    # the two runs' checkpoints: the fp16 EMA of runs whose fp32 EMAs are equal
    a = torch.load(runs['stock']['last'], weights_only=False)['model'].state_dict()  # stripped: EMA -> model
    b = torch.load(runs['ours']['last'], weights_only=False)['model'].state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize('src', ['stock', 'ours'])
def test_resume_from_either(runs, src):
    s, o = runs[f'stock_from_{src}'], runs[f'ours_from_{src}']
    assert s['ema_class'] == 'ModelEMA' and o['ema_class'] == 'UltralyticsEMA'
    assert len(o['batch_loss']) == 4 and s['batch_loss'] == o['batch_loss']  # epoch 1 of 2
    assert [e for e, _ in o['metrics']] == [1, 2] and s['updates'] == o['updates'] == 8
    _assert_ema_equal(s, o, f'resumed from {src}')
    assert s['metrics'] == o['metrics']


def _free_port():
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def test_ddp_workers_use_our_ema(tmp_path):
    need('ultralytics')
    need('cloudpickle')  # Ultralytics' DDP hand-off pickles with it
    cfg = tmp_path / 'config'
    parent = _run(tmp_path, 'ours', 'ddp-parent', 'parent.pt', '--data', str(tmp_path / 'data'), '--project',
                  str(tmp_path / 'runs'), '--config', str(cfg), '--skip-nonfinite')
    port = str(_free_port())
    env = lambda r: {'RANK': str(r), 'LOCAL_RANK': str(r), 'WORLD_SIZE': '2', 'MASTER_ADDR': '127.0.0.1',  # noqa
                     'MASTER_PORT': port}
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, str(RUNNER), 'ours', 'ddp-worker', str(tmp_path / f'w{r}.pt'),
                               '--state', parent['py'], '--config', str(cfg)], cwd=tmp_path, env={**os.environ,
                              **env(r)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    logs = [p.communicate(timeout=900)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-6000:]
    sys.stderr.write(f'\nDDP, 2 gloo ranks, 1 epoch: {time.perf_counter() - t0:.1f} s\n')
    for r in (0, 1):
        w = torch.load(tmp_path / f'w{r}.pt', weights_only=False)
        assert w['rank'] == r and not w['patched_before_train']  # the parent's patch did not reach the worker
        assert w['classes_seen'] == ['UltralyticsEMA'] and w['ema_class'] == 'UltralyticsEMA'
        assert w['skip_nonfinite'] is True and w['wrapped'] == '_GlooDDP' and w['updates'] == 4
        assert w['same_ema_all_ranks'] and w['ema_finite']
        assert w['rebuilt_class'] == 'UltralyticsEMA' and w['rebuilt_updates'] == 7
