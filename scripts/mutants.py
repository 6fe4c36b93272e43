"""A mutation check you can rerun: apply one small deliberate bug at a time to a copy of the package, run the tests
against the copy, and report which bugs no test caught.

    python scripts/mutants.py            # every mutant; exit 1 if any survives
    python scripts/mutants.py -k prune   # the mutants whose name contains "prune"

Each mutant names the test files that should catch it: they run first (``-x``), and only a mutant they miss runs
the whole ``not slow`` suite, whose first failure is then checked against the unmutated copy. So a caught mutant
costs one test file, and the run stays within minutes. The copy keeps the built _C library (the mutants are in
the Python layer: the pure-torch twin, the wrappers, ModelEMA, the fake kernels, the validation, the seed's other
names), and the tests import the copy. Each mutant must match its target text exactly once, checked for all of
them before any test runs, so a refactor that moves the code fails loudly instead of silently passing.
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# the test files each mutant runs first
EMA = ('test_ema_model.py',)
TWIN = ('test_pure_torch.py',)
FOLD = ('test_ops_fold.py',)
COUNT = ('test_ops_count.py',)
OPS_EMA = ('test_ops_ema.py',)
RELIABILITY = ('test_reliability.py',)
GUARD = ('test_ema_guard.py',)
CONTRACT = ('test_ema_contract.py',)
PRUNE = ('test_prune.py',)
PARALLEL = ('test_parallel.py',)
TIME_SYNC = ('test_time_sync.py',)
RESULTS = ('test_profile_results.py',)
SEED_HELPERS = ('test_helpers_vs_seed.py',)
DEVICE = ('test_device.py',)

# (name, file, text, replacement, test files)
MUTANTS = [
    ('ema decay step uses updates, not updates + 1', 'torchutils_ext/ema.py',
     'return (self.decay(self._updates + 1) if decay is None else decay), None',
     'return (self.decay(self._updates) if decay is None else decay), None', EMA),
    ('twin EMA rounding order: one fused multiply-add instead of the seed steps', 'torchutils_ext/_torch_ops.py',
     '        tmp = ms if scratch_is_free else None\n        if tmp is None:\n            tmp = torch._foreach_mul(ms, omd)'
     '\n        else:\n            torch._foreach_mul_(tmp, omd)\n        torch._foreach_mul_(es, d)\n'
     '        torch._foreach_add_(es, tmp)',
     '        torch._foreach_mul_(es, d)\n        torch._foreach_add_(es, ms, alpha=omd)', TWIN),
    ('twin lerp: product and sum rounded apart instead of torch.lerp', 'torchutils_ext/_torch_ops.py',
     '        torch._foreach_lerp_(es, ms, omd if not isinstance(omd, torch.Tensor) else [omd] * len(ms))',
     '        torch._foreach_add_(es, torch._foreach_mul(torch._foreach_sub(ms, es), omd))', TWIN),
    ('twin lerp of a seed-rounding pair in the EMA dtype, not the wider one', 'torchutils_ext/_torch_ops.py',
     '        e.copy_(torch.lerp(e.to(wide), m.to(wide), omd))',
     '        e.copy_(torch.lerp(e, m.to(e.dtype), omd))', RELIABILITY),
    ('twin fold axis: ConvTranspose groups ignored', 'torchutils_ext/_torch_ops.py',
     '    if transposed_groups == 0:\n        return scale.view(-1, *tail)',
     '    if True:\n        return scale.view(-1, *tail) if transposed_groups == 0 else scale.view(1, -1, *tail[1:])',
     FOLD),
    ('twin fold bias term: + mean instead of - mean', 'torchutils_ext/_torch_ops.py',
     "shift = (_cat_or_fill(bias, counts, 0.0, v) - torch.cat(", "shift = (_cat_or_fill(bias, counts, 0.0, v) + torch.cat(",
     FOLD),
    ('twin fold bias of half layers scaled by 1.05', 'torchutils_ext/_torch_ops.py',
     '            out_b[i] = shift.to(w.dtype, copy=True)',
     '            out_b[i] = (shift * (1.05 if w.dtype in _LOW else 1.0)).to(w.dtype, copy=True)', FOLD),
    ('twin zero test counts -0.0 as non-zero', 'torchutils_ext/_torch_ops.py',
     '    torch.logical_not(flat, out=out)', '    torch.eq(flat.view(torch.int32) if flat.dtype == torch.float32 '
     'else flat, 0, out=out)', COUNT),
    ('twin zero count drops the packed small tensors', 'torchutils_ext/_torch_ops.py',
     '            counts.append(_zeros_in(packed, flags))', '            pass', TWIN),
    ('fake kernel: no length check', 'torchutils_ext/_fake.py',
     "    if len(ema) != len(model):\n        raise ValueError(f'ema and model lists differ in length: "
     "{len(ema)} vs {len(model)}')", '    pass', OPS_EMA),
    ('overlap check never finds overlap', 'torchutils_ext/_validate.py', 'def _shared(writes, reads=()):',
     'def _shared(writes, reads=()):\n    return False\n\n\ndef _unused_shared(writes, reads=()):', RELIABILITY),
    ('state watch twin ignores tensor metadata', 'torchutils_ext/_ema_plan.py',
     'if not isinstance(got, torch.Tensor) or _meta(got) != metas[arg]:', 'if not isinstance(got, torch.Tensor):',
     ('test_ema_watch.py', 'test_ema_model.py')),
    ('state watch twin ignores the registration generation', 'torchutils_ext/_ema_plan.py',
     '        if self.generation != GENERATION[0]:', '        if False:', ('test_ema_watch.py', 'test_ema_model.py')),
    ('guard: the twin never finds a NaN/Inf', 'torchutils_ext/_torch_ops.py',
     '        if all(ok):\n            return torch.zeros((), dtype=torch.bool)',
     '        if True:\n            return torch.zeros((), dtype=torch.bool)', GUARD),
    ('capturable ramp from updates, not updates + 1', 'torchutils_ext/_ema_schedule.py', '    u = count + 1\n',
     '    u = count\n', GUARD),
    ('decay tensor: one sharing memory with the EMA is not refused', 'torchutils_ext/_validate.py',
     '        if s is not None and s[0] < span[1] and span[0] < s[1] and _share_memory(decay_tensor, span, t, s):',
     '        if False:', ('test_ops_ema.py',)),
    ('decay tensor: an invalid value read on the device is applied', 'torchutils_ext/_torch_ops.py',
     '                invalid = ~decay_is_valid(decay_tensor).to(device)',
     '                invalid = torch.zeros((), dtype=torch.bool, device=device)', ('test_ops_ema.py',)),
    ('sparsity divides by the parameter count, not the element count', 'torchutils_ext/sparsity.py',
     'return _zeros(params) / sum(p.numel() for p in params)', 'return _zeros(params) / len(params)', COUNT),
    # ModelEMA's constructor contract
    ('ModelEMA(updates=N) starts the count at 0', 'torchutils_ext/ema.py',
     '        self.updates = updates\n', '        self.updates = 0\n', CONTRACT),
    ('ModelEMA(updates=N, capturable=True) starts the device counter at 0', 'torchutils_ext/ema.py',
     'self._count = _counter(updates, device)', 'self._count = _counter(0, device)', CONTRACT),
    ('the EMA copy is left in train mode', 'torchutils_ext/ema.py',
     'self.ema = _copy_model(de_parallel(model)).eval()', 'self.ema = _copy_model(de_parallel(model))', CONTRACT),
    ('a deep copy drops the skipped-step count', 'torchutils_ext/ema.py',
     "        state['_plan'] = None\n", "        state['_plan'] = None\n        state['_guard'] = None\n", CONTRACT),
    ('non-persistent buffers are averaged too', 'torchutils_ext/_ema_plan.py',
     '        if name not in nps:\n', '        if True:\n', CONTRACT),
    # the seed's other names, checked by their results
    ('prune leaves weight_orig/weight_mask (pruning not made permanent)', 'torchutils_ext/sparsity.py',
     "        tprune.remove(m, 'weight')  # make permanent", '        pass', PRUNE),
    ('global prune ranks each layer on its own', 'torchutils_ext/sparsity.py',
     'if global_unstructured and convs:', 'if False:', PRUNE),
    ('is_parallel misses DistributedDataParallel', 'torchutils_ext/distributed.py',
     'return type(model) in (nn.parallel.DataParallel, nn.parallel.DistributedDataParallel)',
     'return type(model) is nn.parallel.DataParallel', PARALLEL),
    ('update_attr drops its exclude', 'torchutils_ext/ema.py',
     'copy_attr(self.ema, model, include, exclude)', 'copy_attr(self.ema, model, include)', PARALLEL),
    ('time_sync reads perf_counter, not the wall clock', 'torchutils_ext/device.py',
     '    return time.time()', '    return time.perf_counter()', TIME_SYNC),
    ("time_sync(device='cpu') waits on CUDA", 'torchutils_ext/device.py',
     "if (device is None or device.type == 'cuda') and torch.cuda.is_available():",
     'if torch.cuda.is_available():', TIME_SYNC),
    ('model_info returns the parameter count as the gradient count', 'torchutils_ext/profiling.py',
     'return n_l, n_p, n_g, flops or 0.0', 'return n_l, n_p, n_p, flops or 0.0', RESULTS),
    ('profile sums the runs instead of averaging them', 'torchutils_ext/profiling.py',
     'tf += f / n', 'tf += f', RESULTS),
    ('profile times the warm-up run', 'torchutils_ext/profiling.py',
     '                _step(m, x, clock)  # warm-up', '                pass  # warm-up', RESULTS),
    ('initialize_weights changes BatchNorm2d subclasses too', 'torchutils_ext/training.py',
     '        if type(m) is nn.BatchNorm2d:', '        if isinstance(m, nn.BatchNorm2d):', SEED_HELPERS),
    ('device_count on a CUDA build asks NVML first', 'torchutils_ext/device.py',
     '        if _torch_cuda_built():\n            return int(torch.cuda.device_count())',
     '        if _torch_cuda_built() and _nvml_count() is None:\n            return int(torch.cuda.device_count())',
     SEED_HELPERS),
    ("select_device ignores Ultralytics' batch=", 'torchutils_ext/device.py',
     '        batch_size = batch\n', '        pass\n', DEVICE),
]


def _copy_tree(dst):
    ignore = shutil.ignore_patterns('.git', '.venv*', 'build', '__pycache__', '*.egg-info', '.hypothesis',
                                    'results')
    shutil.copytree(ROOT, dst, ignore=ignore)


def _check_targets(chosen):
    """Every target text must occur exactly once, before anything runs."""
    bad = []
    for name, path, old, _, _ in chosen:
        n = (ROOT / path).read_text().count(old)
        if n != 1:
            bad.append(f'{name}: target found {n} times in {path} (expected once): {old!r}')
    if bad:
        raise SystemExit('update scripts/mutants.py:\n' + '\n'.join(bad))


def _apply(tree, path, old, new):
    f = tree / path
    f.write_text(f.read_text().replace(old, new))


def _run_tests(tree, targets, pytest_args):
    """pytest -x on targets inside tree: (failed, first failing test id or None)."""
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    env['PYTHONDONTWRITEBYTECODE'] = '1'
    # the copy must shadow an editable install of the original: plain path import from the copy's root
    cmd = [sys.executable, '-c', 'import sys; sys.meta_path = [f for f in sys.meta_path if "torchutils_ext" not in '
           'getattr(f, "__module__", "")]; import pytest; sys.exit(pytest.main(sys.argv[1:]))',
           *targets, '-x', '-q', '-p', 'no:cacheprovider', '-m', 'not slow', *pytest_args]
    p = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    failed = re.findall(r'^(?:FAILED|ERROR) (\S+)', p.stdout, re.M)
    if p.returncode not in (0, 1):  # 1: tests failed; anything else (usage, collection, no tests) is no verdict
        raise SystemExit(f'pytest {" ".join(targets)} exited {p.returncode} in {tree}:\n{p.stdout[-3000:]}')
    return p.returncode == 1, (failed[0] if failed else None)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('-k', default='', help='run only the mutants whose name contains this text')
    ap.add_argument('pytest_args', nargs='*')
    args = ap.parse_args()
    chosen = [m for m in MUTANTS if args.k in m[0]]
    _check_targets(chosen)
    files = list(dict.fromkeys(f'tests/{f}' for m in chosen for f in m[4]))
    t0 = time.perf_counter()
    survivors = []
    with tempfile.TemporaryDirectory(prefix='mutants-') as tmp:
        clean = Path(tmp) / 'clean'
        _copy_tree(clean)
        failed, first = _run_tests(clean, files, args.pytest_args)
        if failed:
            raise SystemExit(f'the unmutated copy fails {first}: fix that first')
        for name, path, old, new, tests in chosen:
            tree = Path(tmp) / 'mutant'
            shutil.rmtree(tree, ignore_errors=True)
            shutil.copytree(clean, tree)
            _apply(tree, path, old, new)
            caught, first = _run_tests(tree, [f'tests/{f}' for f in tests], args.pytest_args)
            where = ''
            if not caught:  # missed by its own files: the whole suite, and its first failure checked clean
                caught, first = _run_tests(tree, ['tests'], args.pytest_args)
                if caught and _run_tests(clean, [first], args.pytest_args)[0]:
                    raise SystemExit(f'{first} fails without the mutant too: fix that first')
                where = '  (outside its test files: list the file that caught it)' if caught else ''
            print(f"{'caught' if caught else 'SURVIVED':8s}  {name}" + (f'  <- {first}' if first else '') + where,
                  flush=True)
            if not caught:
                survivors.append(name)
    print(f'{len(chosen) - len(survivors)} of {len(chosen)} mutants caught in {time.perf_counter() - t0:.0f} s')
    sys.exit(1 if survivors else 0)


if __name__ == '__main__':
    main()
