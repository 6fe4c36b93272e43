"""The speed targets for our rows, stated as ratios. Printed as met / short; they never fail a run.

Each target: (metric, op, value); metrics are row keys: median_ms (CUDA only), vs_seed, vs_best (vs the fastest
correct row that is not ours), vs_peer (vs the fastest correct pure-torch peer with our numerics), pct_roof (vs
the 256 MiB roofline), pct_limit (vs a same-bytes add_ after the same flush, timed interleaved: the roofline does
not pay the flushed cache's write-back), launches.
"""

# Ratios, measured in the same run, so that they carry over to any machine (absolute times would be one
# machine's): x seed, x the best peer, % of the same-bytes limit.
_CPU = {
    ('ema', 's'): [('pct_limit', '>=', 90), ('vs_seed', '>=', 4)],
    ('ema', 'n'): [('vs_best', '>=', 1.15)],
    ('ema', 'l'): [('pct_limit', '>=', 95)],
    ('fuse', 'l'): [('vs_seed', '>=', 60), ('vs_best', '>=', 1.3)],
    ('sparsity', 'l'): [('vs_seed', '>=', 6)],
    ('ul-ema', '*'): [('vs_best', '>=', 1.2)],  # vs Ultralytics' own update, both modes, every size
    ('ul-fuse', '*'): [('vs_best', '>=', 1.5)],  # vs their BaseModel.fuse
}
_CUDA = {
    ('ema', 's'): [('median_ms', '<=', 0.060), ('launches', '<=', 1)],
    ('ema', 'l'): [('pct_roof', '>=', 80)],
    ('ema', 'x'): [('pct_roof', '>=', 80)],
    ('ema-mixed', '*'): [('vs_best', '>=', 3)],
}
# The NaN/Inf guard's compiled rows against their floor (the unguarded update + a read-only pass over the model,
# timed in the same run: bench_report._vs_floor), fp32 and bf16 model.
_GUARD_CPU = {(b, m): [('vs_floor', '<=', 1.1)] for b in ('ema', 'ema-mixed') for m in 'sl'}
# Our pure-torch rows, on every model and device: never slower than the seed, and at least as fast as the best
# pure-torch peer with the same numerics (vs_peer; the peers are named in SAME_NUMERICS: for the fp32 EMA the
# seed itself is one, its per-tensor temporaries stay in cache; with a bf16 model the seed rounds (1 - d) * m to
# bf16, which ours does not).
_PURE = [('vs_seed', '>=', 1.0), ('vs_peer', '>=', 1.0)]
SAME_NUMERICS = {
    'ema': ('seed ModelEMA (state_dict each call)', 'foreach mul, mul_, add_, cached lists (seed formula, no FMA)'),
    'ema-mixed': ('foreach mul, mul_, add_, cached lists (seed formula, no FMA)',),
    'fuse': ('pure-torch in-place broadcast fold per layer',),
    'sparsity': ('seed loop ((p == 0).sum() per parameter)', 'count_nonzero per parameter, summed'),
}
# At torch's default thread count (what users run), read from the side-by-side table: our compiled rows against a
# named peer of the same count, and the row's own speed-up from the first count (1 thread) to it.
_THREADED = {('ema', m): [('x foreach lerp, cached lists', '>=', 1.2)] for m in 'nsml'}
_THREADED[('raw-ema', '*')] = [('scaling', '>=', 1.5)]

_UNITS = {'median_ms': ' ms', 'vs_seed': 'x seed', 'vs_best': 'x best', 'vs_peer': 'x same-numerics peer',
          'pct_roof': '% roof', 'pct_limit': '% limit', 'vs_floor': 'x floor',
          'launches': ' launch'}


def targets_for(bench, model, device, impl):
    """Targets apply to our rows (whole-model fuse_model for fusion; the optional NaN/Inf guard's compiled CPU rows
    only against their floor)."""
    if 'skip_nonfinite' in impl:
        return _GUARD_CPU.get((bench, model), []) if device == 'cpu' and '(compiled)' in impl else []
    if not impl.startswith('ours') or (bench == 'fuse' and 'fuse_model' not in impl):
        return []
    if bench.startswith('ul-') and 'pure torch' in impl:
        return []  # the Ultralytics targets are for the compiled path the integration runs
    if 'pure torch' in impl:
        return _PURE if bench in SAME_NUMERICS else []
    table = _CUDA if device == 'cuda' else _CPU
    return table.get((bench, model), table.get((bench, '*'), []))


def evaluate(row, device):
    """'met' / 'short: ...' / '' (no target) for one finished row."""
    ts = targets_for(row['bench'], row['model'], device, row['impl'])
    if not ts or row.get('median_ms') is None:
        return ''
    short = []
    for metric, op, value in ts:
        got = row.get(metric)
        ok = got is not None and (got <= value if op == '<=' else got >= value)
        if not ok:
            shown = 'n/a' if got is None else f'{got:.3g}'
            short.append(f'{shown}{_UNITS[metric]} (want {op} {value:g})')
    return 'met' if not short else 'short: ' + '; '.join(short)


def evaluate_threaded(row, group, scaling, device):
    """'met' / 'short: ...' / '' for one row of the side-by-side table, at the count the targets are set for.
    group: that count's rows of the same (bench, model); scaling: the row's speed-up from the first count."""
    if device != 'cpu' or row.get('median_ms') is None or not row['impl'].startswith('ours') \
            or '(compiled)' not in row['impl'] or 'skip_nonfinite' in row['impl']:
        return ''
    ts = _THREADED.get((row['bench'], row['model']), _THREADED.get((row['bench'], '*'), []))
    if not ts:
        return ''
    short = []
    for metric, op, value in ts:
        if metric == 'scaling':
            got, unit = scaling, 'x over 1 thread'
        else:
            peer = next((r for r in group if r['impl'] == metric[2:] and r.get('median_ms')), None)
            got, unit = (peer['median_ms'] / row['median_ms'] if peer else None), f' {metric}'
        if got is None or not (got >= value if op == '>=' else got <= value):
            short.append(f"{'n/a' if got is None else format(got, '.3g')}{unit} (want {op} {value:g})")
    return 'met' if not short else 'short: ' + '; '.join(short)
