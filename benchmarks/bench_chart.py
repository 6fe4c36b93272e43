"""An SVG chart of a benchmark run: our speed-up over the seed and over the best peer, per op and model, for the
compiled and the pure-torch paths (and the pure-torch path over its same-numerics peer, its target). Hand-written
SVG (no plotting dependency); a log scale with 1x marked."""
import math
from xml.sax.saxutils import escape

SERIES = [('compiled', 'vs_seed', 'compiled: x seed', '#1f4e99'),
          ('compiled', 'vs_best', 'compiled: x best peer', '#7fa6e0'),
          ('pure torch', 'vs_seed', 'pure torch: x seed', '#b35900'),
          ('pure torch', 'vs_best', 'pure torch: x best peer', '#f0a860'),
          ('pure torch', 'vs_peer', 'pure torch: x same-numerics peer', '#7a9a3a')]
BAR, GAP, LEFT, WIDTH = 9, 8, 170, 560  # px: bar height, gap between models, label column, plot width


def _ours(rows, bench, model, path):
    """Our whole-model row for that path (fuse_model, not the per-layer contract)."""
    for r in rows:
        if (r['bench'], r['model'], r['role']) == (bench, model, 'ours') and f'({path})' in r['impl'] \
                and 'per layer' not in r['impl'] and r.get('median_ms') is not None:
            return r
    return None


def svg(rows, titles, caption):
    vals = [r.get(k) for r in rows if r['role'] == 'ours' for _, k, _, _ in SERIES if r.get(k)]
    if not vals:
        return None
    lo, hi = math.log10(min(0.5, min(vals))), math.log10(max(2.0, max(vals)) * 1.3)
    x = lambda v: LEFT + (math.log10(v) - lo) / (hi - lo) * WIDTH  # noqa: E731
    out, y = [], 40
    for bench, title in titles.items():
        models = []
        for r in rows:
            if r['bench'] == bench and r['model'] not in models and r['role'] == 'ours':
                models.append(r['model'])
        if not models:
            continue
        out.append(f'<text x="8" y="{y}" font-weight="bold">{escape(title)}</text>')
        y += 10
        for model in models:
            out.append(f'<text x="{LEFT - 8}" y="{y + 2 * BAR + 2}" text-anchor="end">{escape(model)}</text>')
            for path, key, _, colour in SERIES:
                r = _ours(rows, bench, model, path)
                v = r.get(key) if r else None
                if v:
                    out.append(f'<rect x="{x(10 ** lo):.1f}" y="{y}" width="{x(v) - x(10 ** lo):.1f}" '
                               f'height="{BAR - 1}" fill="{colour}"/>')
                    out.append(f'<text x="{x(v) + 3:.1f}" y="{y + BAR - 1}" font-size="9">{v:.2f}x</text>')
                y += BAR
            y += GAP
        y += 14
    ticks = [t for t in (0.25, 0.5, 1, 2, 5, 10, 20, 50, 100, 200) if lo <= math.log10(t) <= hi]
    axis = [f'<line x1="{x(1):.1f}" y1="30" x2="{x(1):.1f}" y2="{y - 10}" stroke="#333" stroke-dasharray="3,3"/>']
    for t in ticks:
        axis.append(f'<text x="{x(t):.1f}" y="{y + 4}" text-anchor="middle" font-size="10">{t:g}x</text>')
    legend, lx = [], 8
    for _, _, name, colour in SERIES:
        legend.append(f'<rect x="{lx}" y="{y + 16}" width="10" height="10" fill="{colour}"/>'
                      f'<text x="{lx + 14}" y="{y + 25}" font-size="10">{escape(name)}</text>')
        lx += 150 if len(name) < 24 else 200
    height = y + 40
    head = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{max(LEFT + WIDTH + 60, lx + 20)}" height="{height}" '
            'font-family="sans-serif" font-size="11">'
            f'<rect width="100%" height="100%" fill="white"/><text x="8" y="18">{escape(caption)}</text>')
    return head + ''.join(axis + out + legend) + '</svg>\n'
