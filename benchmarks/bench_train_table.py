"""The training-step table (test_bench_train_step.py rows): where a step's time goes, seed vs ours."""

COLS = ['model', 'implementation', 'step ms', 'min–max ms', 'training part ms', 'torch_utils ms / step',
        'share of step', 'torch_utils x seed', 'step x seed', 'check', 'note']


def _ms(v):
    return '' if v is None else format(v, '.3f' if v < 10 else '.1f')


def markdown(rows):
    """Lines of one table; a sentence first saying what a step and the per-step utilities are."""
    done = next((r for r in rows if r.get('median_ms') is not None), None)
    lines = []
    if done:
        sizes = list(dict.fromkeys(r['model'] for r in rows))  # the sizes this run measured, in row order
        names = f"yolov5{sizes[0]}" if len(sizes) == 1 else f"yolov5{{{','.join(sizes)}}}"
        lines += [f"{names} from the package's yaml, {done['imgsz']} px, batch {done['batch']}, synthetic data. "
                  'Step = training part (to float / 255, forward, loss, backward, clip, optimizer step) + '
                  "torch_utils: the EMA update every step, plus the per-epoch calls (note) spread over "
                  f"{done['epoch_steps']} steps. Medians after warm-up, sides interleaved step by step.", '']
    lines += ['| ' + ' | '.join(COLS) + ' |', '|' + '---|' * len(COLS)]
    for r in rows:
        if r.get('median_ms') is None:
            cells = [f"yolov5{r['model']}", r['impl'], '—'] + [''] * 6 + [r['check'], r['note']]
        else:
            ratio = r.get('utils_vs_seed')
            cells = [f"yolov5{r['model']}", r['impl'], _ms(r['median_ms']), f"{_ms(r['min_ms'])}–{_ms(r['max_ms'])}",
                     _ms(r['train_ms']), _ms(r['utils_ms']), f"{100 * r['share']:.1f}%",
                     '' if ratio is None or r['role'] == 'seed' else f'{ratio:.2f}',
                     '' if r['role'] == 'seed' or r.get('vs_seed') is None else f"{r['vs_seed']:.3f}",
                     r['check'], r['note']]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return lines
