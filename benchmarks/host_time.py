"""Host time of one ``ModelEMA.update``: every tensor of a YOLOv5-shaped model cut to one element, so that what is
left is the per-step host work (the plan's proof that nothing changed, the crossing into C++, the dispatch), warm
and right after a 128 MiB cache flush (as after a training step). CPU, 1 thread.

    python benchmarks/host_time.py --models n,l                 # this checkout (as installed or on PYTHONPATH)
    python benchmarks/host_time.py --ab OTHER_CHECKOUT --rounds 7
        # interleaved A/B: alternating processes, this checkout and a built OTHER_CHECKOUT (e.g. a git worktree of
        # an earlier commit, built in place), medians of the per-process medians
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


def _worker(models, calls):
    import torch
    sys.path.insert(0, str(ROOT / 'tests'))
    from yolo_models import build_yolov5 as yolov5

    import torchutils_ext as tx
    torch.set_num_threads(1)
    flush = torch.empty(128 << 20, dtype=torch.uint8)
    out = {'compiled': tx.backend_info()['compiled']}
    for size in models:
        model = yolov5(size)
        with torch.no_grad():
            for t in [*model.parameters(), *model.buffers()]:
                t.data = t.data.reshape(-1)[:1].clone()
        ema = tx.ModelEMA(model)
        for _ in range(20):
            ema.update(model)
        warm, cold = [], []
        for _ in range(calls):
            t0 = time.perf_counter()
            ema.update(model)
            warm.append(time.perf_counter() - t0)
        for _ in range(calls // 4):
            flush.fill_(1)
            t0 = time.perf_counter()
            ema.update(model)
            cold.append(time.perf_counter() - t0)
        out[size] = {'warm_us': statistics.median(warm) * 1e6, 'flushed_us': statistics.median(cold) * 1e6}
    return out


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
    ap.add_argument('--worker', action='store_true')
    args = ap.parse_args()
    models = args.models.split(',')
    if args.worker:
        print(json.dumps(_worker(models, args.calls)))
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
