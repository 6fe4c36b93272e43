"""Line and branch coverage of torchutils_ext/ by the test suite (coverage.py; not part of CI: it runs the suite
again under a tracer, several minutes here).

    pip install coverage
    python scripts/coverage.py                 # the `not slow` suite
    python scripts/coverage.py -m ''           # every test, slow ones too (pytest arguments go last)

Prints one row per module, then every public function (the names in torchutils_ext.__all__, and the public
methods of its classes) whose coverage is under 80%. Code run only in a subprocess (the import-failure tests, the
spawned gloo workers) is not measured, nor are the compiled kernels.
"""
import inspect
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / 'torchutils_ext'
THRESHOLD = 80.0


def _run(data, report, pytest_args):
    cmd = [sys.executable, '-m', 'coverage', 'run', '--branch', '--source', str(PKG), '--data-file', str(data),
           '-m', 'pytest', 'tests', '-q', '-p', 'no:cacheprovider', '-m', 'not slow', *pytest_args]
    rc = subprocess.run(cmd, cwd=ROOT).returncode
    subprocess.run([sys.executable, '-m', 'coverage', 'json', '--data-file', str(data), '-o', str(report),
                    '--quiet'], cwd=ROOT, check=True)
    return rc


def _pct(s):
    total = s['num_statements'] + s.get('num_branches', 0)
    return 100.0 * (s['covered_lines'] + s.get('covered_branches', 0)) / total if total else 100.0


def _public_functions():
    """(module file, qualified name) of every public function and method, from __all__."""
    sys.path.insert(0, str(ROOT))
    import torchutils_ext as tx
    out = []
    for name in tx.__all__:
        obj = getattr(tx, name)
        if inspect.isclass(obj):
            for attr, fn in vars(obj).items():
                if isinstance(fn, property):
                    fn = fn.fget
                if inspect.isfunction(fn) and (not attr.startswith('_') or attr in ('__init__', '__call__')):
                    out.append((inspect.getsourcefile(fn), fn.__qualname__))
        elif inspect.isfunction(obj):
            fn = inspect.unwrap(obj)
            out.append((inspect.getsourcefile(fn), fn.__qualname__))
    return out


def main():
    with tempfile.TemporaryDirectory(prefix='coverage-') as tmp:
        data, report = Path(tmp) / '.coverage', Path(tmp) / 'coverage.json'
        rc = _run(data, report, sys.argv[1:])
        files = json.loads(report.read_text())['files']
    files = {str((ROOT / f).resolve()): v for f, v in files.items()}
    print(f"\n{'module':28s} {'lines':>6s} {'missed':>6s} {'branches':>8s} {'partial':>7s} {'line %':>6s} "
          f"{'branch %':>8s} {'both %':>6s}")
    totals = {'num_statements': 0, 'covered_lines': 0, 'num_branches': 0, 'covered_branches': 0,
              'missing_lines': 0, 'num_partial_branches': 0}
    for path in sorted(files):
        s = files[path]['summary']
        for k in totals:
            totals[k] += s.get(k, 0)
        _row(Path(path).relative_to(ROOT).as_posix(), s)
    _row('total', totals)
    low = []
    for path, qual in _public_functions():
        fn = files.get(str(Path(path).resolve()), {}).get('functions', {}).get(qual)
        if fn is None:
            low.append(f'{qual} ({Path(path).name}): not measured')
        elif _pct(fn['summary']) < THRESHOLD:
            s = fn['summary']
            low.append(f"{qual} ({Path(path).name}): {_pct(s):.0f}% (lines {s['covered_lines']}/"
                       f"{s['num_statements']}, branches {s.get('covered_branches', 0)}/{s.get('num_branches', 0)}; "
                       f"missing lines {fn['missing_lines']})")
    print(f'\npublic functions under {THRESHOLD:.0f}%:' + ''.join(f'\n  {x}' for x in low) if low else
          f'\nevery public function is at {THRESHOLD:.0f}% or more')
    sys.exit(rc)


def _row(name, s):
    lines = 100.0 * s['covered_lines'] / s['num_statements'] if s['num_statements'] else 100.0
    br = 100.0 * s['covered_branches'] / s['num_branches'] if s['num_branches'] else 100.0
    print(f"{name:28s} {s['num_statements']:6d} {s['missing_lines']:6d} {s['num_branches']:8d} "
          f"{s['num_partial_branches']:7d} {lines:6.1f} {br:8.1f} {_pct(s):6.1f}")


if __name__ == '__main__':
    main()
