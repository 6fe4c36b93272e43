"""Checks that the CUDA kernels round every product and sum separately whatever nvcc's contraction flag.

Each csrc/**/*.cu is compiled for one arch (sm_90 unless SASS_ARCH says otherwise) WITHOUT --fmad=false, and its
SASS read with cuobjdump. Fails when:
  - a guard-check, fold-weight or zero-count kernel holds a fused multiply-add (FFMA, DFMA, HFMA2, ...): their
    math is products and sums only, which must round separately (csrc/common/rounding.h);
  - an EMA kernel holds any other than the "lerp" mode's explicit fma_rn (torch.lerp's one rounding): its count
    must be the same with and without --fmad=false;
  - any kernel holds more of them than the same file built with --fmad=false (the shipped flag): a contraction.
    The fold's channel kernel has some in both builds, from the IEEE divide and sqrt routines, which need them.
An FMA with a zero register as a factor is nvcc's idiom for loading a constant, not arithmetic, and is not counted.
A self-test first proves the parser finds the FFMA of a plain `a * b + c`.

    python scripts/check_sass.py          (CUDA_HOME, or the toolkit under /usr/local; cuobjdump from the toolkit,
                                           PATH, or the one the triton package ships)
"""
import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCH = os.environ.get('SASS_ARCH', 'sm_90')
# setup.py's nvcc flags and the ones torch's cpp_extension adds, less --fmad=false (added for the comparison build)
FLAGS = ['-O3', '-std=c++17', '--expt-relaxed-constexpr', '-D__CUDA_NO_HALF_OPERATORS__',
         '-D__CUDA_NO_HALF_CONVERSIONS__', '-D__CUDA_NO_BFLOAT16_CONVERSIONS__', '-D__CUDA_NO_HALF2_OPERATORS__']
NO_FMA = ('nonfinite_kernel', 'fold_weights_kernel', 'count_zeros_kernel')
EXPLICIT_FMA_ONLY = ('ema_kernel',)  # the lerp's fma_rn, which --fmad=false keeps
FMA = re.compile(r'\b(?:FFMA2?|DFMA|HFMA2?)(?:\.[A-Z0-9_]+)*\s+([^;]*);')
TYPES = {'f': 'float', 'd': 'double', '6__half': 'half', '13__nv_bfloat16': 'bfloat16'}


def label(symbol):
    """fold_channels_kernel<float, 32> from the mangled symbol (no c++filt needed)."""
    m = re.search(r'([a-z_]+_kernel)I(\w*?)Li(\d+)E', symbol)
    if m is None:
        return symbol
    first = next((name for code, name in TYPES.items() if m.group(2).startswith(code)), None)
    return f'{m.group(1)}<{first + ", " if first else ""}{m.group(3)}>'



def toolkit():
    homes = [os.environ.get('CUDA_HOME', ''), '/usr/local/cuda', *sorted(glob.glob('/usr/local/cuda-*'), reverse=True)]
    nvcc = next((os.path.join(h, 'bin', 'nvcc') for h in homes if h and os.path.isfile(os.path.join(h, 'bin', 'nvcc'))),
                shutil.which('nvcc'))
    dump = next((os.path.join(h, 'bin', 'cuobjdump') for h in homes
                 if h and os.path.isfile(os.path.join(h, 'bin', 'cuobjdump'))), shutil.which('cuobjdump'))
    spec = importlib.util.find_spec('triton')
    if dump is None and spec is not None and spec.submodule_search_locations:
        bundled = os.path.join(spec.submodule_search_locations[0], 'backends', 'nvidia', 'bin', 'cuobjdump')
        dump = bundled if os.path.isfile(bundled) else None
    if nvcc is None or dump is None:
        sys.exit(f'check_sass: needs nvcc and cuobjdump (found nvcc={nvcc}, cuobjdump={dump})')
    return nvcc, dump


def fma_counts(nvcc, dump, source, extra, out_dir):
    """{kernel symbol: fused multiply-adds} of one source built with FLAGS + extra."""
    cubin = os.path.join(out_dir, os.path.basename(source) + ('.fmad_off' if extra else '') + '.cubin')
    subprocess.run([nvcc, '-cubin', f'-arch={ARCH}', *FLAGS, *extra, '-I', os.path.join(ROOT, 'csrc'), source, '-o',
                    cubin], check=True)
    sass = subprocess.run([dump, '-sass', cubin], check=True, capture_output=True, text=True).stdout
    counts, name = {}, None
    for line in sass.splitlines():
        m = re.search(r'Function : (\S+)', line)
        if m:
            name = m.group(1)
            counts[name] = 0
            continue
        f = FMA.search(line)
        if f and name is not None:
            factors = [x.strip().lstrip('-|') for x in f.group(1).split(',')[1:3]]
            counts[name] += 'RZ' not in factors  # RZ times anything: a constant load
    return counts


def self_test(nvcc, dump, out_dir):
    src = os.path.join(out_dir, 'contract_kernel.cu')
    with open(src, 'w') as f:
        f.write('__global__ void contract_kernel(float* y, const float* a, const float* b) '
                '{ y[threadIdx.x] = a[threadIdx.x] * b[threadIdx.x] + y[threadIdx.x]; }\n')
    found = sum(fma_counts(nvcc, dump, src, [], out_dir).values())
    if not found:
        sys.exit('check_sass: the self-test found no FFMA in a plain a * b + c: the SASS parser is broken')


def main():
    nvcc, dump = toolkit()
    sources = sorted(glob.glob(os.path.join(ROOT, 'csrc', '**', '*.cu'), recursive=True))
    failures, t0 = [], time.time()
    with tempfile.TemporaryDirectory() as out_dir:
        self_test(nvcc, dump, out_dir)
        print(f'{"kernel (" + ARCH + ")":<36}{"FMAs without --fmad=false":>26}{"with it (shipped)":>20}')
        for src in sources:
            free = fma_counts(nvcc, dump, src, [], out_dir)
            shipped = fma_counts(nvcc, dump, src, ['--fmad=false'], out_dir)
            for sym in sorted(free, key=label):
                name, n, ref = label(sym), free[sym], shipped.get(sym, 0)
                print(f'{name:<36}{n:>26}{ref:>20}')
                if name.split('<')[0] in NO_FMA and n:
                    failures.append(f'{name}: {n} fused multiply-adds where none may be')
                if name.split('<')[0] in EXPLICIT_FMA_ONLY and n != ref:
                    failures.append(f'{name}: {n} fused multiply-adds without --fmad=false, {ref} with it: only '
                                    'explicit fma_rn may be there')
                if n > ref:
                    failures.append(f'{name}: {n} fused multiply-adds without --fmad=false, {ref} with it (a '
                                    'contracted a * b + c)')
    print(f'check_sass: {len(sources)} files in {time.time() - t0:.0f} s')
    if failures:
        print('check_sass: FAILED\n  ' + '\n  '.join(failures))
        sys.exit(1)
    print('check_sass: ok, no contracted multiply-add in any kernel')


if __name__ == '__main__':
    main()
