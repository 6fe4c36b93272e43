"""Collects benchmark rows, derives ratios / % of roofline / target status, renders markdown, writes files."""
import json
import os

import bench_chart
import bench_train_table
from bench_targets import SAME_NUMERICS, evaluate, evaluate_threaded

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results')
TITLES = {'train': 'YOLOv5 v7.0 training step (fp32)',
          'train-bf16': 'YOLOv5 v7.0 training step (bf16 autocast, fp32 model and EMA)',
          'ema': 'EMA update (fp32 model, fp32 EMA)', 'ema-mixed': 'EMA update (bf16 model, fp32 EMA)',
          'fuse': 'Conv+BN fusion, every pair of the model', 'sparsity': 'sparsity(model)',
          'fuse-graph': 'Conv/Linear+BN fusion of models wired in forward() (graph rule; tracing included)',
          'raw-ema': 'Raw ema_update_ on lists past the caches (128 x 256 KiB fp32 EMA + the same model)',
          'raw-count': 'Raw count_zeros on a list past the caches (128 x 256 KiB fp32, 30% zeros)',
          'ul-ema': "Ultralytics' ModelEMA.update vs ours (fp32, their yaml models)",
          'ul-fuse': "Ultralytics' BaseModel.fuse vs ours (enable_for_ultralytics)"}


def _stem(device, quick, threads=None, prefix=''):
    """results/[prefix]<device>[-quick][-t<threads>]: one run's tables; without threads, the side-by-side tables
    (or the tables of a run at one thread count)."""
    return os.path.join(RESULTS_DIR, f"{prefix}{device}{'-quick' if quick else ''}"
                                     f"{'' if threads is None else f'-t{threads}'}")


def _prefix(rows):
    """'train_step_' for a run of the training step alone: its files must not replace the full tables."""
    return 'train_step_' if rows and all(r['bench'].startswith('train') for r in rows) else ''


class Report:
    def __init__(self, device, quick, info, per_count=False):
        """per_count: this run is one of several thread counts (written as -t<threads>, merged by side_by_side)."""
        self.device, self.quick, self.info, self.per_count = device, quick, info, per_count
        self.rows, self.roof, self.roof_runs = [], None, None

    def remove_count(self, threads):
        """Deletes this run's tables at another thread count (a stale one must not be merged if that run fails)."""
        for ext in ('.json', '.md', '.svg'):
            path = _stem(self.device, self.quick, threads, _prefix(self.rows)) + ext
            if os.path.exists(path):
                os.remove(path)

    def add(self, bench, model, impl, role, timing=None, bytes_moved=None, launches=None, check='', note='', **extra):
        """role: 'seed' | 'peer' (pure-torch / third-party competitors) | 'ours' | 'limit' (a bandwidth yardstick,
        not a competitor) | 'read' (a read-only pass over the model: with the unguarded row, the guard's floor).
        timing None = row not run. extra: a bench's own columns (the training step's)."""
        row = {'bench': bench, 'model': model, 'impl': impl, 'role': role, 'bytes': bytes_moved,
               'launches': launches, 'check': check, 'note': note, **extra}
        row.update(timing or {'median_ms': None})
        self.rows.append(row)
        return row

    def finalize(self):
        """Ratios within each (bench, model) group: x seed = seed/this; x best = fastest correct pure-torch
        row that is not ours (peers, third-party, or the seed itself when it wins) / this. >1 = faster."""
        for key in {(r['bench'], r['model']) for r in self.rows}:
            group = [r for r in self.rows if (r['bench'], r['model']) == key and r['median_ms'] is not None]
            seed = next((r['median_ms'] for r in group if r['role'] == 'seed'), None)
            peers = [r['median_ms'] for r in group if r['role'] in ('seed', 'peer') and r['check'].startswith('ok')]
            best = min(peers) if peers else None
            twins = [r['median_ms'] for r in group if r['impl'] in SAME_NUMERICS.get(key[0], ())
                     and r['check'].startswith('ok')]
            twin = min(twins) if twins else None
            limit = next((r['median_ms'] for r in group if r['role'] == 'limit'), None)
            reads = [r['median_ms'] for r in group if r['role'] == 'read']
            plain = {r['impl']: r['median_ms'] for r in group if r['role'] == 'ours'}
            for r in group:
                t = r['median_ms']
                r['pct_roof'] = (100 * r['bytes'] / (self.roof['gb_per_s'] * 1e9) / (t * 1e-3)
                                 if r['bytes'] and self.roof else None)
                if r['role'] in ('limit', 'read'):  # yardsticks, not competitors: only their % roofline
                    continue
                r['vs_seed'] = r.get('paired_vs_seed') or (seed / t if seed else None)  # a bench's own pairing
                r['vs_best'] = best / t if best else None
                r['vs_peer'] = twin / t if twin else None
                r['pct_limit'] = 100 * limit / t if limit else None
                r['vs_floor'] = _vs_floor(r, plain, reads)
                r['target'] = evaluate(r, self.device)
        order = {b: i for i, b in enumerate(TITLES)}
        self.rows.sort(key=lambda r: (order.get(r['bench'], 99), _model_key(r['model'])))

    def markdown(self):
        i = self.info
        lines = [f"# torchutils_ext benchmarks ({self.device}{', quick' if self.quick else ''})", '',
                 f"{i['date']} · commit {i.get('commit', 'unknown')} · CPU: {i['cpu']} ({i['cpu_count']} logical) · "
                 f"GPU: {i.get('gpu', 'none')} · torch {i['torch']}{' · CUDA ' + i['cuda'] if i.get('cuda') else ''} · "
                 f"threads {i['threads']} · torchutils_ext {i.get('torchutils_ext')}", '']
        if self.roof:
            lines += [f"Roofline: `dst.add_(src)` over 256 MiB = {self.roof['gb_per_s']:.1f} GB/s (3 x bytes, "
                      f"median {self.roof['median_ms']:.2f} ms; the faster of a run before and one after the "
                      "benchmarks). x seed / x best: speed-up (>1 = faster) vs the seed / vs the fastest correct "
                      "row that is not ours (seed, pure-torch peers, timm/Ultralytics). x peer (our pure-torch rows): "
                      "vs the fastest pure-torch peer with the same numerics. % roofline: bytes the op "
                      "must move / roofline bandwidth / time. % limit (EMA, CPU): time of one `dst.add_(src)` moving the same "
                      "bytes after the same cache flush / time, timed interleaved with the rows.", '']
        cols = ['model', 'implementation', 'median ms', 'min–max ms', 'x seed', 'x best', 'x peer', '% roofline',
                '% limit', 'launches', 'check', 'target']
        keep = [i for i, c in enumerate(cols) if not (c == 'launches' and self.device == 'cpu')]  # CUDA only
        for bench, title in TITLES.items():
            rows = [r for r in self.rows if r['bench'] == bench]
            if not rows:
                continue
            if bench.startswith('train'):
                lines += [f'## {title}', ''] + bench_train_table.markdown(rows) + ['']
                continue
            lines += [f'## {title}', '', '| ' + ' | '.join(cols[i] for i in keep) + ' |', '|' + '---|' * len(keep)]
            for r in rows:
                cells = _cells(r)
                lines.append('| ' + ' | '.join(cells[i] for i in keep) + ' |')
            lines.append('')
        return '\n'.join(lines)

    def write(self):
        os.makedirs(RESULTS_DIR, exist_ok=True)
        stem = _stem(self.device, self.quick, self.info['threads'] if self.per_count else None, _prefix(self.rows))
        with open(stem + '.json', 'w') as f:
            json.dump({'machine': self.info, 'quick': self.quick, 'roofline': self.roof,
                       'roofline_runs': self.roof_runs, 'rows': self.rows},
                      f, indent=1, default=str)
        with open(stem + '.md', 'w') as f:
            f.write(self.markdown() + '\n')
        i = self.info
        where = i['cpu'] if self.device == 'cpu' else i.get('gpu', '')
        chart = bench_chart.svg(self.rows, TITLES, f"torchutils_ext speed-up, {self.device}"
                                f"{' (quick)' if self.quick else ''}: {where}, torch {i['torch']}, {i['threads']} "
                                f"thread(s), {i['date']}, commit {i.get('commit', 'unknown')}")
        if chart:
            with open(stem + '.svg', 'w') as f:
                f.write(chart)
        return stem


def _vs_floor(row, plain, reads):
    """A guarded EMA row's time / (its unguarded row + the fastest read-only pass over the model): the guard must
    read every model value before it writes any (all or nothing), so that sum is its floor."""
    unguarded = plain.get(row['impl'].replace(' skip_nonfinite', ''))
    if 'skip_nonfinite' not in row['impl'] or not reads or not unguarded:
        return None
    return row['median_ms'] / (unguarded + min(reads))


def _model_key(m):
    if m in ('n', 's', 'm', 'l', 'x'):
        return ('nsmlx'.index(m), '')
    if m.startswith('yolo') and m[-1] in 'nsmlx':  # Ultralytics names: family, then size
        return (9, m[:-1], 'nsmlx'.index(m[-1]))
    return (9, m)


def _fmt(v, spec):
    return '' if v is None else format(v, spec)


def _cells(r):
    if r['median_ms'] is None:
        return [r['model'], r['impl'], '—', '', '', '', '', '', '', '', r['check'], r['note']]
    ms = r['median_ms']
    spec = '.3f' if ms < 10 else '.1f'
    return [r['model'], r['impl'], format(ms, spec), f"{r['min_ms']:{spec}}–{r['max_ms']:{spec}}",
            _fmt(r.get('vs_seed'), '.2f'), _fmt(r.get('vs_best'), '.2f'),
            _fmt(r.get('vs_peer') if r['role'] == 'ours' and 'pure torch' in r['impl'] else None, '.2f'),
            _fmt(r.get('pct_roof'), '.0f'),
            _fmt(r.get('pct_limit'), '.0f'), _fmt(r['launches'], 'd'), r['check'],
            ' '.join(x for x in (r.get('target', ''), _floor_note(r), r['note']) if x)]


def _floor_note(r):
    return f"{r['vs_floor']:.2f}x floor (unguarded + read)" if r.get('vs_floor') else ''


def side_by_side(first, other_counts, default):
    """The tables of `first` (this process's finished Report) and of the runs at other_counts (read from their
    -t<N>.json) side by side: per count the median and the ratios to the seed and to the best peer of that count,
    the speed-up from the first count to each other, and the targets. Written as results/<device>[-quick].md/.json
    (the chart: the default count's). Returns (markdown, stem)."""
    runs = [{'machine': first.info, 'roofline': first.roof, 'rows': first.rows}]
    for n in other_counts:
        path = _stem(first.device, first.quick, n, _prefix(first.rows)) + '.json'
        if os.path.exists(path):
            with open(path) as f:
                runs.append(json.load(f))
    md = _side_by_side_markdown(first.device, first.quick, runs, default)
    stem = _stem(first.device, first.quick, None, _prefix(first.rows))
    os.makedirs(RESULTS_DIR, exist_ok=True)
    with open(stem + '.json', 'w') as f:
        json.dump({'quick': first.quick, 'default_threads': default, 'runs': runs}, f, indent=1, default=str)
    with open(stem + '.md', 'w') as f:
        f.write(md + '\n')
    shown = next((r for r in runs if r['machine']['threads'] == default), runs[-1])
    i = shown['machine']
    chart = bench_chart.svg(shown['rows'], TITLES, f"torchutils_ext speed-up, {first.device}"
                            f"{' (quick)' if first.quick else ''}: {i['cpu']}, torch {i['torch']}, {i['threads']} "
                            f"thread(s), {i['date']}, commit {i.get('commit', 'unknown')}")
    if chart:
        with open(stem + '.svg', 'w') as f:
            f.write(chart)
    return md, stem


def _side_by_side_markdown(device, quick, runs, default):
    counts = [r['machine']['threads'] for r in runs]
    prefix = _prefix(runs[0]['rows'])
    keyed = [{(r['bench'], r['model'], r['impl']): r for r in run['rows']} for run in runs]
    at = counts.index(default) if default in counts else len(counts) - 1  # the count the threaded targets use
    i = runs[0]['machine']
    lines = [f"# torchutils_ext benchmarks ({device}{', quick' if quick else ''}), "
             f"{' and '.join(_threads(n, default) for n in counts)}", '',
             f"{i['date']} · commit {i.get('commit', 'unknown')} · CPU: {i['cpu']} ({i['cpu_count']} logical) · "
             f"torch {i['torch']} · torchutils_ext {i.get('torchutils_ext')}", '',
             'Each thread count timed in a process of its own (rows interleaved within it, as in each count\'s '
             'full table: ' + ', '.join(f"`{os.path.basename(_stem(device, quick, n, prefix))}.md`" for n in counts) +
             ', with min–max, % roofline and % limit). x seed / x best: speed-up over the seed / over the fastest '
             'correct row that is not ours, at the same thread count. ' +
             ' '.join(f'x {counts[0]}→{n}: the row\'s own speed-up from {counts[0]} to {n} threads.' for n in counts[1:]) +
             ' Roofline (`dst.add_(src)`, 256 MiB): ' +
             ', '.join(f"{run['roofline']['gb_per_s']:.1f} GB/s at {n}" for n, run in zip(counts, runs)
                       if run.get('roofline')) + '.', '']
    head = ['model', 'implementation']
    for n in counts:
        head += [f'{_threads(n, default)}: ms', 'x seed', 'x best']
    head += [f'x {counts[0]}→{n}' for n in counts[1:]] + ['check', 'target']
    for bench, title in TITLES.items():
        rows = [r for r in runs[0]['rows'] if r['bench'] == bench]
        if not rows:
            continue
        lines += [f'## {title}', '', '| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
        for r in rows:
            key = (r['bench'], r['model'], r['impl'])
            same = [k.get(key) or {'median_ms': None, 'check': 'not run'} for k in keyed]
            cells = [r['model'], r['impl']]
            for x in same:
                ms = x.get('median_ms')
                cells += ['—' if ms is None else format(ms, '.3f' if ms < 10 else '.1f'),
                          _fmt(x.get('vs_seed'), '.2f'), _fmt(x.get('vs_best'), '.2f')]
            scaling = [same[0]['median_ms'] / x['median_ms'] if same[0].get('median_ms') and x.get('median_ms')
                       else None for x in same[1:]]
            cells += [_fmt(v, '.2f') for v in scaling]
            checks = {x.get('check', '') for x in same}
            cells.append(checks.pop() if len(checks) == 1 else
                         '; '.join(f"{n}: {x.get('check', '')}" for n, x in zip(counts, same)))
            group = [x for x in runs[at]['rows'] if (x['bench'], x['model']) == key[:2]]
            threaded = evaluate_threaded(same[at], group, scaling[at - 1] if at else None, device)
            own = [f"{n}: {x['target']}" for n, x in zip(counts, same) if x.get('target')]
            cells.append('; '.join(own + ([f'at {counts[at]}: {threaded}'] if threaded else []) +
                                   ([r['note']] if r.get('note') else [])))
            lines.append('| ' + ' | '.join(str(c) for c in cells) + ' |')
        lines.append('')
    return '\n'.join(lines)


def _threads(n, default):
    return f"{n} thread{'s' if n > 1 else ''}{' (default)' if n == default else ''}"


def rerender(json_path):
    """Tables and chart again from a run's json (after a change to the report's layout; nothing is re-timed)."""
    with open(json_path) as f:
        d = json.load(f)
    device = 'cuda' if 'cuda' in os.path.basename(json_path) else 'cpu'
    if 'runs' in d:  # side by side: re-rendered from the counts' rows as stored
        stem = os.path.splitext(json_path)[0]
        with open(stem + '.md', 'w') as f:
            f.write(_side_by_side_markdown(device, d['quick'], d['runs'],
                                           d['default_threads']) + '\n')
        return stem
    per_count = '-t' in os.path.basename(json_path)
    r = Report(device, d['quick'], d['machine'], per_count=per_count)
    r.roof, r.roof_runs, r.rows = d['roofline'], d.get('roofline_runs'), d['rows']
    r.finalize()
    return r.write()


if __name__ == '__main__':
    import sys
    for path in sys.argv[1:]:
        print('written:', rerender(path) + '.{json,md,svg}')
