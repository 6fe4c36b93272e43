"""Thread counts of a benchmark run: each count is timed in a process of its own (the native thread pool takes
torch.set_num_threads only before its first parallel op, and one process per count keeps each count's warm
pools and caches apart). The pytest process runs the first count; at the end of its session it runs
`pytest` again, with the same arguments, once per further count, and the report puts the counts side by side.
Imported by conftest.py before anything sets a thread count, so DEFAULT is torch's own default.
"""
import os
import subprocess
import sys

import torch

DEFAULT = torch.get_num_threads()  # torch's default here (one per core, or OMP_NUM_THREADS): what users run
CHILD_ENV = 'TORCHUTILS_EXT_BENCH_CHILD'  # set in the runs of further counts: they only write their own tables


def specs(option, device):
    """['1', 'default', '4', ...] from --threads (default: 1 and torch's default on CPU, 1 on CUDA), without
    counts that resolve to the same number."""
    items = [s.strip() for s in (option or ('1,default' if device == 'cpu' else '1')).split(',') if s.strip()]
    out, seen = [], set()
    for s in items:
        if s != 'default' and not (s.isdigit() and int(s) > 0):
            raise ValueError(f"--threads takes positive integers and 'default', got {s!r}")
        n = resolve(s)
        if n not in seen:
            seen.add(n)
            out.append(s)
    return out


def resolve(spec):
    return DEFAULT if spec == 'default' else int(spec)


def label(spec):
    n = resolve(spec)
    return f"{n} thread{'s' if n > 1 else ''}{' (default)' if n == DEFAULT else ''}"


def apply(spec):
    """Set this process's thread count; 'default' leaves torch's own, as a user's process has it."""
    if spec != 'default':
        torch.set_num_threads(int(spec))


def is_child():
    return os.environ.get(CHILD_ENV) == '1'


def _args_without_threads(args):
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a == '--threads':
            skip = True
        elif not a.startswith('--threads='):
            out.append(a)
    return out


def run_other_counts(config, others, write_line):
    """Runs pytest with the same arguments at each further count; returns the counts whose run failed."""
    params = config.invocation_params
    failed = []
    for spec in others:
        cmd = [sys.executable, '-m', 'pytest', *_args_without_threads(list(params.args)), '--threads', spec]
        write_line(f'benchmarks at {label(spec)}, in a process of its own: {" ".join(cmd[1:])}')
        r = subprocess.run(cmd, cwd=str(params.dir), env={**os.environ, CHILD_ENV: '1'}, capture_output=True,
                           text=True)
        lines = (r.stdout + r.stderr).strip().splitlines()
        write_line(f'  {label(spec)}: {lines[-1] if lines else "no output"}')
        if r.returncode != 0:
            failed.append(spec)
            write_line('\n'.join(lines[-80:]))
    return failed
