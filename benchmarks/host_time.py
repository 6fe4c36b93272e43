"""Host time of one ``ModelEMA.update``: every tensor of a YOLOv5-shaped model cut to one element, so that what is
left is the per-step host work (the plan's proof that nothing changed, the crossing into C++, the dispatch), warm
and right after a 128 MiB cache flush (as after a training step). CPU, 1 thread.

    python benchmarks/host_time.py --models n,l                 # this checkout (as installed or on PYTHONPATH)
    python benchmarks/host_time.py --ab OTHER_CHECKOUT --rounds 7
        # interleaved A/B: alternating processes, this checkout and a built OTHER_CHECKOUT (e.g. a git worktree of
        # an earlier commit, built in place), medians of the per-process medians
    python benchmarks/host_time.py --ab OTHER_CHECKOUT --paired --rounds 40 --calls 100
        # both checkouts in live processes, batches of --calls updates taken in turn: the median of the per-pair
        # ratios holds on a loaded machine, where per-process medians split into "had a core" / "shared one"
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _setup(models):
    """(flush buffer, {size: (ema, model)}) with every tensor cut to one element, warmed up."""
    import torch
    sys.path.insert(0, str(ROOT / 'tests'))
    from yolo_models import build_yolov5 as yolov5

    import torchutils_ext as tx
    torch.set_num_threads(1)
    pairs = {}
    for size in models:
        model = yolov5(size)
        with torch.no_grad():
            for t in [*model.parameters(), *model.buffers()]:
                t.data = t.data.reshape(-1)[:1].clone()
        ema = tx.ModelEMA(model)
        for _ in range(20):
            ema.update(model)
        pairs[size] = (ema, model)
    return torch.empty(128 << 20, dtype=torch.uint8), pairs


def _median_us(ema, model, calls, flush=None):
    times = []
    for _ in range(calls):
        if flush is not None:
            flush.fill_(1)
        t0 = time.perf_counter()
        ema.update(model)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def _worker(models, calls):
    import torchutils_ext as tx
    flush, pairs = _setup(models)
    out = {'compiled': tx.backend_info()['compiled']}
    for size, (ema, model) in pairs.items():
        out[size] = {'warm_us': _median_us(ema, model, calls), 'flushed_us': _median_us(ema, model, calls // 4, flush)}
    return out


def _serve(models):
    """--paired's worker: one batch per request line ('SIZE warm|flushed CALLS'), its median in us per line."""
    flush, pairs = _setup(models)
    print('ready', flush=True)
    for line in sys.stdin:
        size, what, calls = line.split()
        ema, model = pairs[size]
        print(_median_us(ema, model, int(calls), flush if what == 'flushed' else None), flush=True)


def _paired(other, models, calls, rounds):
    """Both checkouts in live processes, short batches taken in turn (the first alternating), so that a machine
    loaded by other jobs (or a busy SMT sibling) slows both sides of each pair alike: the median of the per-pair
    ratios, beside the medians of each side's batches."""
    procs = {}
    for k, path in (('this', ROOT), ('other', other)):
        cmd = [sys.executable, __file__, '--serve', '--models', ','.join(models)]
        procs[k] = subprocess.Popen(cmd, env=dict(os.environ, PYTHONPATH=str(path)), cwd=str(path),
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert procs[k].stdout.readline().strip() == 'ready', k
    print(f'ModelEMA.update host time, one-element tensors, 1 thread, {rounds} pairs of batches taken in turn:')
    try:
        for size in models:
            for what, n in (('warm', calls), ('flushed', max(1, calls // 4))):
                got = {'this': [], 'other': []}
                for r in range(rounds):
                    for k in (('this', 'other') if r % 2 == 0 else ('other', 'this')):
                        procs[k].stdin.write(f'{size} {what} {n}\n')
                        procs[k].stdin.flush()
                        got[k].append(float(procs[k].stdout.readline()))
                ratio = statistics.median(a / b for a, b in zip(got['this'], got['other']))
                print(f'  yolov5{size} {what}: this {statistics.median(got["this"]):.1f} us, other '
                      f'{statistics.median(got["other"]):.1f} us, median this/other per pair {ratio:.3f}')
    finally:
        for p in procs.values():
            p.stdin.close()
            p.wait()


def _run(path, models, calls):
    env = dict(os.environ, PYTHONPATH=str(path))
    cmd = [sys.executable, __file__, '--worker', '--models', ','.join(models), '--calls', str(calls)]
    got = subprocess.run(cmd, env=env, cwd=str(path), capture_output=True, text=True, check=True)
    return json.loads(got.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--models', default='n,l')
    ap.add_argument('--calls', type=int, default=400)
    ap.add_argument('--ab', help='another built checkout to compare with, in alternating processes')
    ap.add_argument('--rounds', type=int, default=7)
    ap.add_argument('--paired', action='store_true')
    ap.add_argument('--worker', action='store_true')
    ap.add_argument('--serve', action='store_true')
    args = ap.parse_args()
    models = args.models.split(',')
    if args.worker:
        print(json.dumps(_worker(models, args.calls)))
        return
    if args.serve:
        _serve(models)
        return
    if args.paired:
        _paired(Path(args.ab).resolve(), models, args.calls, args.rounds)
        return
    sides = {'this': ROOT} if not args.ab else {'this': ROOT, 'other': Path(args.ab).resolve()}
    runs = {k: [] for k in sides}
    for r in range(args.rounds if args.ab else 1):
        order = list(sides) if r % 2 == 0 else list(sides)[::-1]
        for k in order:
            runs[k].append(_run(sides[k], models, args.calls))
    print(f'ModelEMA.update host time, one-element tensors, 1 thread, median of {len(runs["this"])} process(es):')
    for size in models:
        for what in ('warm_us', 'flushed_us'):
            row = {k: statistics.median(r[size][what] for r in runs[k]) for k in sides}
            text = ', '.join(f'{k} {v:.1f} us' for k, v in row.items())
            if 'other' in row:
                text += f' (this/other {row["this"] / row["other"]:.3f})'
            print(f'  yolov5{size} {what[:-3]}: {text}')


if __name__ == '__main__':
    main()
