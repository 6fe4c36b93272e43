"""Build torchutils_ext: CPU kernels always, CUDA kernels when a CUDA torch and nvcc are found.

Environment:
  TORCHUTILS_EXT_NO_EXT=1   install the pure-torch package only (no compiler needed)
  TORCHUTILS_EXT_CUDA=0|1   force the CUDA kernels off / on (on = fail loudly if they cannot be built)
  TORCH_CUDA_ARCH_LIST      GPU archs to build for (default: the visible GPU's, else DEFAULT_ARCHS below)
  CUDA_HOME                 CUDA toolkit root (default: found from the real nvcc, or /usr/local/cuda)
Always install with --no-build-isolation: the build must use the torch that will import the extension.
"""
import glob
import os
import shutil
import sys

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
    cxx = ['-O3', '-g0', '-ffp-contract=off', '-fno-math-errno']
    # one folder per op (validation, CPU kernel, CUDA glue *_cuda.cpp and kernel *.cu) plus common/ and python/
    cpp = _sources('csrc/**/*.cpp')
    srcs = [p for p in cpp if not p.endswith('_cuda.cpp')]
    include_dirs = [os.path.join(ROOT, 'csrc')]
    build_info = {'ext': True, 'cuda': use_cuda, 'torch_built_with': torch.__version__, 'cuda_version': torch.version.cuda
                  if use_cuda else None, 'cuda_arch_list': None}
    if not use_cuda:
        ext = cpp_extension.CppExtension('torchutils_ext._C', srcs, include_dirs=include_dirs,
                                         extra_compile_args={'cxx': cxx})
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
    nvcc = ['-O3', '--fmad=false', '-lineinfo', '--expt-relaxed-constexpr']
    ext = cpp_extension.CUDAExtension('torchutils_ext._C', srcs, include_dirs=include_dirs,
                                      define_macros=[('TORCHUTILS_EXT_WITH_CUDA', '1')],
                                      extra_compile_args={'cxx': cxx, 'nvcc': nvcc})
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
