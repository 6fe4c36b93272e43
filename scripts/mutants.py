"""A mutation check you can rerun: apply one small deliberate bug at a time to a copy of the package, run the test
suite against the copy, and report which bugs no test caught.

    python scripts/mutants.py            # every mutant; exit 1 if any survives
    python scripts/mutants.py -k fold    # the mutants whose name contains "fold"

The copy keeps the built _C library (the mutants are in the Python layer: the pure-torch twin, the wrappers,
ModelEMA, the fake kernels, the validation), and the tests import the copy. Each mutant must match its target
text exactly once, so a refactor that moves the code makes the mutant fail loudly instead of silently passing.
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (name, file, text, replacement)
MUTANTS = [
    ('ema decay step uses updates, not updates + 1', 'torchutils_ext/ema.py',
     'return self.decay(self._updates + 1), None', 'return self.decay(self._updates), None'),
    ('twin EMA rounding order: one fused multiply-add instead of the seed steps', 'torchutils_ext/_reference.py',
     '        tmp = ms if scratch_is_free else None\n        if tmp is None:\n            tmp = torch._foreach_mul(ms, omd)'
     '\n        else:\n            torch._foreach_mul_(tmp, omd)\n        torch._foreach_mul_(es, d)\n'
     '        torch._foreach_add_(es, tmp)',
     '        torch._foreach_mul_(es, d)\n        torch._foreach_add_(es, ms, alpha=omd)'),
    ('twin fold axis: ConvTranspose groups ignored', 'torchutils_ext/_reference.py',
     '    if transposed_groups == 0:\n        return scale.view(-1, *tail)',
     '    if True:\n        return scale.view(-1, *tail) if transposed_groups == 0 else scale.view(1, -1, *tail[1:])'),
    ('twin fold bias term: + mean instead of - mean', 'torchutils_ext/_reference.py',
     "shift = (_cat_or_fill(bias, counts, 0.0, v) - torch.cat(", "shift = (_cat_or_fill(bias, counts, 0.0, v) + torch.cat("),
    ('twin fold bias of half layers scaled by 1.05', 'torchutils_ext/_reference.py',
     '            out_b[i] = shift.to(w.dtype, copy=True)',
     '            out_b[i] = (shift * (1.05 if w.dtype in _LOW else 1.0)).to(w.dtype, copy=True)'),
    ('twin zero test counts -0.0 as non-zero', 'torchutils_ext/_reference.py',
     '    torch.logical_not(flat, out=out)', '    torch.eq(flat.view(torch.int32) if flat.dtype == torch.float32 '
     'else flat, 0, out=out)'),
    ('twin zero count drops the packed small tensors', 'torchutils_ext/_reference.py',
     '            counts.append(_zeros_in(packed, flags))', '            pass'),
    ('fake kernel: no length check', 'torchutils_ext/_ops.py',
     "        if len(ema) != len(model):\n            raise ValueError(f'ema and model lists differ in length: "
     "{len(ema)} vs {len(model)}')", '        pass'),
    ('overlap check never finds overlap', 'torchutils_ext/_validate.py', 'def _shared(writes, reads=()):',
     'def _shared(writes, reads=()):\n    return False\n\n\ndef _unused_shared(writes, reads=()):'),
    ('slot check always says current', 'torchutils_ext/_ema_plan.py',
     '    def current(self, ema, model) -> bool:',
     '    def current(self, ema, model) -> bool:\n        return True\n\n    def _unused(self, ema, model):'),
    ('guard: the twin never finds a NaN/Inf', 'torchutils_ext/_reference.py',
     '        if all(ok):\n            return torch.zeros((), dtype=torch.bool)',
     '        if True:\n            return torch.zeros((), dtype=torch.bool)'),
    ('guard: capturable ramp from updates, not updates + 1', 'torchutils_ext/ema.py', 'torch.neg(c + 1)', 'torch.neg(c)'),
    ('decay tensor: one sharing memory with the EMA is not refused', 'torchutils_ext/_validate.py',
     '        if s is not None and s[0] < span[1] and span[0] < s[1] and _share_memory(decay_tensor, span, t, s):',
     '        if False:'),
    ('decay tensor: an invalid value read on the device is applied', 'torchutils_ext/_reference.py',
     '                invalid = ~decay_is_valid(decay_tensor).to(device)',
     '                invalid = torch.zeros((), dtype=torch.bool, device=device)'),
    ('sparsity divides by the parameter count, not the element count', 'torchutils_ext/sparsity.py',
     'return _zeros(params) / sum(p.numel() for p in params)', 'return _zeros(params) / len(params)'),
]


def _copy_tree(dst):
    ignore = shutil.ignore_patterns('.git', '.venv*', 'build', '__pycache__', '*.egg-info', '.hypothesis',
                                    'results')
    shutil.copytree(ROOT, dst, ignore=ignore)


def _apply(tree, path, old, new):
    f = tree / path
    text = f.read_text()
    n = text.count(old)
    if n != 1:
        raise SystemExit(f'mutant target found {n} times in {path} (expected once): update scripts/mutants.py\n'
                         f'{old!r}')
    f.write_text(text.replace(old, new))


def _run_tests(tree, pytest_args):
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    env['PYTHONDONTWRITEBYTECODE'] = '1'
    # the copy must shadow an editable install of the original: plain path import from the copy's root
    cmd = [sys.executable, '-c', 'import sys; sys.meta_path = [f for f in sys.meta_path if "torchutils_ext" not in '
           'getattr(f, "__module__", "")]; import pytest; sys.exit(pytest.main(sys.argv[1:]))',
           'tests', '-x', '-q', '-p', 'no:cacheprovider', '-m', 'not slow', *pytest_args]
    p = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    failed = re.findall(r'^(?:FAILED|ERROR) (\S+)', p.stdout, re.M)
    return p.returncode, failed


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('-k', default='', help='run only the mutants whose name contains this text')
    ap.add_argument('pytest_args', nargs='*')
    args = ap.parse_args()
    chosen = [m for m in MUTANTS if args.k in m[0]]
    survivors = []
    with tempfile.TemporaryDirectory(prefix='mutants-') as tmp:
        clean = Path(tmp) / 'clean'
        _copy_tree(clean)
        rc, failed = _run_tests(clean, args.pytest_args)
        if rc != 0:
            raise SystemExit(f'the unmutated copy fails its tests ({failed}): fix that first')
        for name, path, old, new in chosen:
            tree = Path(tmp) / 'mutant'
            shutil.rmtree(tree, ignore_errors=True)
            shutil.copytree(clean, tree)
            _apply(tree, path, old, new)
            rc, failed = _run_tests(tree, args.pytest_args)
            caught = rc != 0
            print(f"{'caught' if caught else 'SURVIVED':8s}  {name}" + (f'  <- {failed[0]}' if failed else ''),
                  flush=True)
            if not caught:
                survivors.append(name)
    print(f'{len(chosen) - len(survivors)} of {len(chosen)} mutants caught')
    sys.exit(1 if survivors else 0)


if __name__ == '__main__':
    main()
