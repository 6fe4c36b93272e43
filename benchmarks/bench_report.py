"""Collects benchmark rows, derives ratios / % of roofline / target status, renders markdown, writes files."""
import json
import os

import bench_chart
from bench_targets import SAME_NUMERICS, evaluate

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results')
TITLES = {'ema': 'EMA update (fp32 model, fp32 EMA)', 'ema-mixed': 'EMA update (bf16 model, fp32 EMA)',
          'fuse': 'Conv+BN fusion, every pair of the model', 'sparsity': 'sparsity(model)',
          'fuse-graph': 'Conv/Linear+BN fusion of models wired in forward() (graph rule; tracing included)',
          'ul-ema': "Ultralytics' ModelEMA.update vs ours (fp32, their yaml models)",
          'ul-fuse': "Ultralytics' BaseModel.fuse vs ours (enable_for_ultralytics)"}


class Report:
    def __init__(self, device, quick, info):
        self.device, self.quick, self.info = device, quick, info
        self.rows, self.roof, self.roof_runs = [], None, None

    def add(self, bench, model, impl, role, timing=None, bytes_moved=None, launches=None, check='', note=''):
        """role: 'seed' | 'peer' (pure-torch / third-party competitors) | 'ours' | 'limit' (a bandwidth yardstick,
        not a competitor). timing None = row not run."""
        row = {'bench': bench, 'model': model, 'impl': impl, 'role': role, 'bytes': bytes_moved,
               'launches': launches, 'check': check, 'note': note}
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
            for r in group:
                t = r['median_ms']
                r['vs_seed'] = seed / t if seed else None
                r['vs_best'] = best / t if best else None
                r['vs_peer'] = twin / t if twin else None
                r['pct_roof'] = (100 * r['bytes'] / (self.roof['gb_per_s'] * 1e9) / (t * 1e-3)
                                 if r['bytes'] and self.roof else None)
                r['pct_limit'] = 100 * limit / t if limit else None
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
            lines += [f'## {title}', '', '| ' + ' | '.join(cols[i] for i in keep) + ' |', '|' + '---|' * len(keep)]
            for r in rows:
                cells = _cells(r)
                lines.append('| ' + ' | '.join(cells[i] for i in keep) + ' |')
            lines.append('')
        return '\n'.join(lines)

    def write(self):
        os.makedirs(RESULTS_DIR, exist_ok=True)
        stem = os.path.join(RESULTS_DIR, f"{self.device}{'-quick' if self.quick else ''}")
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
            _fmt(r.get('pct_limit'), '.0f'), _fmt(r['launches'], 'd'), r['check'], ' '.join(x for x in (r.get('target', ''), r['note']) if x)]


def rerender(json_path):
    """Tables and chart again from a run's json (after a change to the report's layout; nothing is re-timed)."""
    with open(json_path) as f:
        d = json.load(f)
    device = 'cuda' if os.path.basename(json_path).startswith('cuda') else 'cpu'
    r = Report(device, d['quick'], d['machine'])
    r.roof, r.roof_runs, r.rows = d['roofline'], d.get('roofline_runs'), d['rows']
    r.finalize()
    return r.write()


if __name__ == '__main__':
    import sys
    for path in sys.argv[1:]:
        print('written:', rerender(path) + '.{json,md,svg}')
