"""Build torchutils_ext: CPU kernels always, CUDA kernels when a CUDA torch and nvcc are found.

Environment:
  TORCHUTILS_EXT_NO_EXT=1   install the pure-torch package only (no compiler needed)
  TORCHUTILS_EXT_CUDA=0|1   force the CUDA kernels off / on (on = fail loudly if they cannot be built)
  TORCH_CUDA_ARCH_LIST      GPU archs to build for (default: the visible GPU's, else DEFAULT_ARCHS below)
  CUDA_HOME                 CUDA toolkit root (default: found from the real nvcc, or /usr/local/cuda)
  TORCHUTILS_EXT_OPENMP=0   build the CPU kernels serial even where torch runs its own ops on OpenMP threads
  OMP_PREFIX                macOS: where libomp's include/omp.h is, if not in torch, Homebrew or conda
Always install with --no-build-isolation: the build must use the torch that will import the extension.
"""
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
NO_EXT = os.environ.get('TORCHUTILS_EXT_NO_EXT', '0') == '1'
DEFAULT_ARCHS = '7.5;8.0;8.6;8.9;9.0;10.0;11.0;12.0+PTX'


def _find_cuda_home():
    """CUDA_HOME, else the standard toolkit folders, else the real nvcc's root.

    `nvcc` on PATH may be a wrapper script (e.g. /usr/local/bin/nvcc), from which torch guesses a wrong root
    and the link fails (`cannot find -lcudart`); a root counts only if it has the toolkit's headers.
    """
    if os.environ.get('CUDA_HOME'):
        return os.environ['CUDA_HOME']
    candidates = ['/usr/local/cuda'] + sorted(glob.glob('/usr/local/cuda-*'), reverse=True)
    nvcc = shutil.which('nvcc')
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for c in candidates:
        if os.path.isfile(os.path.join(c, 'bin', 'nvcc')) and os.path.isfile(os.path.join(c, 'include', 'crt',
                                                                                          'host_config.h')):
            return c
    return None


def _omp_runtime_loaded():
    """(kind, path) of the OpenMP runtime torch loaded in this process: kind 'gomp', 'omp' or 'iomp5', from
    /proc/self/maps (Linux) or torch/lib (macOS wheels ship libomp.dylib there); (None, None) if none is found."""
    try:
        with open('/proc/self/maps') as f:
            paths = {line.split()[-1] for line in f if '/' in line}
    except OSError:
        import torch
        lib = os.path.join(os.path.dirname(torch.__file__), 'lib')
        paths = {os.path.join(lib, n) for n in os.listdir(lib)}
    for path in sorted(paths):
        m = re.match(r'lib(gomp|iomp5|omp)[.-]', os.path.basename(path))
        if m:
            return m.group(1), path
    return None, None


def _macos_omp_include(torch_dir):
    """A folder holding omp.h for Apple clang (which ships none): $OMP_PREFIX, torch's own include, Homebrew's
    libomp, conda's."""
    roots = [os.environ.get('OMP_PREFIX'), torch_dir]
    try:
        roots.append(subprocess.run(['brew', '--prefix', 'libomp'], capture_output=True, text=True,
                                    timeout=30).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    roots.append(os.environ.get('CONDA_PREFIX'))
    for root in filter(None, roots):
        if os.path.isfile(os.path.join(root, 'include', 'omp.h')):
            return os.path.join(root, 'include')
    return None


def _compiles(cxx, cflags, lflags):
    """Whether cxx builds and links a shared library with an OpenMP parallel region under these flags."""
    src = '#include <omp.h>\nint f() { int n = 0;\n#pragma omp parallel\n{ n = omp_get_num_threads(); }\nreturn n; }\n'
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, 't.cpp'), 'w') as f:
            f.write(src)
        cmd = [cxx, *cflags, '-fPIC', '-shared', os.path.join(d, 't.cpp'), '-o', os.path.join(d, 't.so'), *lflags]
        try:
            return subprocess.run(cmd, capture_output=True, timeout=120).returncode == 0
        except (OSError, subprocess.SubprocessError):
            return False


def _cpu_parallel(torch):
    """(cxx flags, link flags, build-info entry) that put the CPU kernels' at::parallel_for on torch's threads.

    ATen/Config.h says how the headers we compile against parallelise. The native thread pool lives in libtorch:
    nothing to add. OpenMP: at::parallel_for is inline `#pragma omp parallel`, which runs serially unless we
    compile with OpenMP too, and it must be torch's runtime (a second one would not follow torch.set_num_threads
    and its idle threads would spin beside torch's): gcc's -fopenmp where torch runs libgomp, clang's where it
    runs LLVM's libomp, linked against the runtime file torch loaded (wheels may ship a renamed copy, which
    -fopenmp's own -lgomp would load a second time); Apple clang: -Xpreprocessor -fopenmp, omp.h from libomp,
    torch's own libomp.dylib. Any
    other pairing, or a toolchain that cannot build it, gives serial kernels and a message saying so.
    """
    torch_dir = os.path.dirname(torch.__file__)
    with open(os.path.join(torch_dir, 'include', 'ATen', 'Config.h')) as f:
        openmp = re.search(r'#define\s+AT_PARALLEL_OPENMP\s+1', f.read()) is not None
    if not openmp:
        return [], [], 'native thread pool'
    if os.environ.get('TORCHUTILS_EXT_OPENMP') == '0':
        return [], [], 'serial (TORCHUTILS_EXT_OPENMP=0)'
    cxx = os.environ.get('CXX', 'c++')
    try:
        version = subprocess.run([cxx, '--version'], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        version = ''
    clang, (runtime, runtime_path) = 'clang' in version, _omp_runtime_loaded()
    # linked against the very file torch loaded (its soname: the loader then finds it loaded), not -fopenmp's own
    cflags, lflags = ['-fopenmp'], [runtime_path]
    if sys.platform == 'darwin' and runtime == 'omp':
        inc = _macos_omp_include(torch_dir)
        lib = os.path.join(torch_dir, 'lib')
        cflags = ['-Xpreprocessor', '-fopenmp'] + (['-I' + inc] if inc else [])
        lflags = ['-L' + lib, '-lomp', '-Wl,-rpath,' + lib]
    elif runtime != ('omp' if clang else 'gomp'):
        return [], [], _serial(f"{'clang' if clang else cxx} cannot use torch's OpenMP runtime "
                               f"({'lib' + runtime if runtime else 'none found'})",
                               'build with g++ where torch runs libgomp (the Linux wheels)')
    if not _compiles(cxx, cflags, lflags):
        return [], [], _serial(f"{cxx} {' '.join(cflags)} does not build OpenMP code here",
                               'brew install libomp, or set OMP_PREFIX' if sys.platform == 'darwin' else
                               "install the compiler's OpenMP support (libgomp)")
    return cflags, lflags, f'OpenMP (lib{runtime})'


def _serial(why, fix):
    print(f"torchutils_ext: WARNING: the CPU kernels will run on one thread, while torch's own ops use "
          f"torch.get_num_threads(): {why}. To fix: {fix}.", file=sys.stderr)
    return f'serial: {why}'


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern), recursive=True))


def _extensions():
    if NO_EXT:
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        sys.exit('torchutils_ext: building the compiled ops needs torch installed first (pip install torch, then '
                 'pip install --no-build-isolation .), or set TORCHUTILS_EXT_NO_EXT=1 for the pure-torch package.')
    if shutil.which(os.environ.get('CXX', 'c++')) is None:
        sys.exit('torchutils_ext: no C++ compiler found. Install one (e.g. apt-get install g++), or set '
                 'TORCHUTILS_EXT_NO_EXT=1 to install the pure-torch package without compiled ops.')

    want_cuda = os.environ.get('TORCHUTILS_EXT_CUDA')
    cuda_home = _find_cuda_home() if torch.version.cuda else None
    use_cuda = bool(torch.version.cuda and cuda_home) if want_cuda is None else want_cuda == '1'
    if use_cuda and not (torch.version.cuda and cuda_home):
        sys.exit('torchutils_ext: TORCHUTILS_EXT_CUDA=1 but ' +
                 ('this torch is a CPU build' if not torch.version.cuda else 'no CUDA toolkit (nvcc) was found'))

    # torch picks the C++ standard (17 or 20 by version). -ffp-contract=off keeps the "yolov5" EMA mode
    # bit-exact (no FMA); -g0 halves compile time.
    # DEBUG=1: -O0 -g for a debugger (and -G device code); not for benchmarks.
    debug = os.environ.get('DEBUG') == '1'
    cxx = ['-O0', '-g'] if debug else ['-O3', '-g0']
    cxx += ['-ffp-contract=off', '-fno-math-errno']
    # Sources by suffix, the one selection rule: every csrc/**/*.cpp builds, except *_cuda.cpp (CUDA glue), which
    # builds with csrc/**/*.cu only when the CUDA kernels do.
    cpp = _sources('csrc/**/*.cpp')
    srcs = [p for p in cpp if not p.endswith('_cuda.cpp')]
    include_dirs = [os.path.join(ROOT, 'csrc')]
    omp_cflags, omp_lflags, parallel = _cpu_parallel(torch)
    cxx += omp_cflags
    build_info = {'ext': True, 'cuda': use_cuda, 'torch_built_with': torch.__version__, 'cuda_version': torch.version.cuda
                  if use_cuda else None, 'cuda_arch_list': None, 'cpu_parallel': parallel}
    if not use_cuda:
        ext = cpp_extension.CppExtension('torchutils_ext._C', srcs, include_dirs=include_dirs,
                                         extra_compile_args={'cxx': cxx}, extra_link_args=omp_lflags)
        return [ext], build_info

    os.environ['CUDA_HOME'] = cuda_home
    cpp_extension.CUDA_HOME = cuda_home  # torch resolved it at import time, possibly from the nvcc wrapper
    if not os.environ.get('TORCH_CUDA_ARCH_LIST'):
        if torch.cuda.is_available():
            archs = sorted({'%d.%d' % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
            os.environ['TORCH_CUDA_ARCH_LIST'] = ';'.join(archs)
        else:  # no GPU visible (torch would crash guessing): every data-centre and consumer arch nvcc 13 builds,
            # from Turing to Blackwell, and PTX of the newest so that a later GPU can JIT-compile it
            os.environ['TORCH_CUDA_ARCH_LIST'] = DEFAULT_ARCHS
    build_info['cuda_arch_list'] = os.environ['TORCH_CUDA_ARCH_LIST']
    # The cu13 torch wheels ship CUDA library headers (cuBLAS, ...) that some ATen CUDA headers include: search
    # them after the toolkit's own, whose cuda_runtime.h they must not shadow.
    late_includes = []
    for site in sys.path:
        inc = os.path.join(site, 'nvidia', 'cu13', 'include')
        if os.path.isdir(inc):
            late_includes += ['-idirafter', inc]
    cxx += late_includes
    srcs += [p for p in cpp if p.endswith('_cuda.cpp')] + _sources('csrc/**/*.cu')
    # The kernels round each product and sum once by construction (rounding intrinsics, csrc/common/rounding.h;
    # scripts/check_sass.py proves in CI that they hold no contracted multiply-add without --fmad=false).
    # --fmad=false stays as a second guard for any plain `a * b + c` a later change might add.
    nvcc = (['-O0', '-g', '-G'] if debug else ['-O3', '-lineinfo']) + ['--fmad=false', '--expt-relaxed-constexpr']
    ext = cpp_extension.CUDAExtension('torchutils_ext._C', srcs, include_dirs=include_dirs,
                                      extra_compile_args={'cxx': cxx, 'nvcc': nvcc}, extra_link_args=omp_lflags)
    return [ext], build_info


def _write_build_info(info):
    with open(os.path.join(ROOT, 'torchutils_ext', '_build_info.py'), 'w') as f:
        f.write('# Written by setup.py at build time.\nBUILD_INFO = %r\n' % (info,))


def _compile_in_parallel(compiler, jobs):
    """Without ninja, setuptools compiles an extension's sources one at a time (minutes for ours): the CUDA ones
    stay serial (torch swaps the compiler executable around each of them), the C++ ones run on `jobs` threads."""
    from concurrent.futures import ThreadPoolExecutor
    serial = compiler.compile
    os.environ['TORCH_NO_COMPILER_WRAPPER'] = '1'  # torch re-wraps the executable per source: keep that a no-op

    def compile(sources, *args, **kwargs):
        cuda = [s for s in sources if s.endswith('.cu')]
        parts = [p for p in ([s for s in sources if s not in cuda][i::jobs] for i in range(jobs)) if p]
        objects = serial(cuda, *args, **kwargs) if cuda else []
        with ThreadPoolExecutor(jobs) as pool:
            for done in pool.map(lambda part: serial(part, *args, **kwargs), parts):
                objects += done
        return objects
    compiler.compile = compile


def _build_ext():
    from torch.utils.cpp_extension import BuildExtension

    class Build(BuildExtension.with_options(use_ninja=shutil.which('ninja') is not None)):
        def build_extensions(self):
            jobs = int(os.environ.get('MAX_JOBS') or os.cpu_count() or 1)
            if not self.use_ninja and jobs > 1:
                _compile_in_parallel(self.compiler, jobs)
            super().build_extensions()
    return Build


exts, info = _extensions()
cmdclass = {}
_write_build_info(info or {'ext': False})  # a pure-torch install is told apart from a failed load
if exts:
    cmdclass['build_ext'] = _build_ext()

setup(ext_modules=exts, cmdclass=cmdclass)
