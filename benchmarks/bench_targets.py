"""DESIGN §4 speed targets, applied to our compiled rows. Printed as met / short; they never fail a run.

Absolute-ms CPU targets were measured on the project's 2-vCPU VM with 1 thread; on other machines read the
relative ones (x seed, x best peer, % of roofline).
Each target: (metric, op, value); metrics are row keys: median_ms, vs_seed, vs_best (vs the fastest correct
row that is not ours), pct_roof (vs the 256 MiB roofline, as the issue states it), pct_limit (vs a same-bytes
add_ after the same flush, timed interleaved: the roofline does not pay the flushed cache's write-back), launches.
"""

_CPU = {
    ('ema', 's'): [('median_ms', '<=', 2.3), ('pct_roof', '>=', 90), ('pct_limit', '>=', 90), ('vs_seed', '>=', 4)],
    ('ema', 'n'): [('median_ms', '<=', 0.85), ('vs_best', '>=', 1.15)],
    ('ema', 'l'): [('median_ms', '<=', 14), ('pct_roof', '>=', 95), ('pct_limit', '>=', 95)],
    ('fuse', 'l'): [('median_ms', '<=', 11)],
    ('sparsity', 'l'): [('median_ms', '<=', 9)],
}
_CUDA = {
    ('ema', 's'): [('median_ms', '<=', 0.060), ('launches', '<=', 1)],
    ('ema', 'l'): [('pct_roof', '>=', 80)],
    ('ema', 'x'): [('pct_roof', '>=', 80)],
    ('ema-mixed', '*'): [('vs_best', '>=', 3)],
}
_UNITS = {'median_ms': ' ms', 'vs_seed': 'x seed', 'vs_best': 'x best', 'pct_roof': '% roof', 'pct_limit': '% limit',
          'launches': ' launch'}


def targets_for(bench, model, device, impl):
    """Targets apply to our compiled rows (whole-model fuse_model for fusion)."""
    if 'compiled' not in impl or (bench == 'fuse' and 'fuse_model' not in impl):
        return []
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
