"""How the package behaves without its compiled ops: each way of losing them gives its own message, in a fresh
process importing a copy of the package (the copy has no _C unless the test puts one there)."""
import importlib.machinery
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import torchutils_ext
from torchutils_ext import _ops

PKG = Path(torchutils_ext.__file__).parent
SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]
PROBE = ("import json, sys, warnings, torch\n"
         # an editable install's finder would hand the copy the real _C: import as a plain install would
         "sys.meta_path = [f for f in sys.meta_path if 'torchutils_ext' not in getattr(f, '__module__', '')]\n"
         "with warnings.catch_warnings(record=True) as w:\n"
         "    warnings.simplefilter('always')\n"
         "    import torchutils_ext as t\n"
         "m = torch.nn.Conv2d(2, 2, 1)\n"
         "print(json.dumps({'where': t.__file__, 'warnings': [str(x.message) for x in w\n"
         "                  if issubclass(x.category, RuntimeWarning)], 'error': t.backend_info()['load_error'],\n"
         "                  'sparsity': float(t.sparsity(m))}))\n")


def _copy(tmp, build_info=None):
    dst = tmp / 'torchutils_ext'
    shutil.copytree(PKG, dst, ignore=shutil.ignore_patterns('_C*', '__pycache__', '_build_info.py'))
    if build_info is not None:
        (dst / '_build_info.py').write_text(f'BUILD_INFO = {build_info!r}\n')
    return dst


def _import(cwd, require=False):
    env = {k: v for k, v in os.environ.items() if not k.startswith('TORCHUTILS_EXT_')}
    env['PYTHONPATH'] = str(cwd)
    if require:
        env['TORCHUTILS_EXT_REQUIRE_EXT'] = '1'
    p = subprocess.run([sys.executable, '-c', PROBE], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    return p


def _ok(p, cwd):
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert Path(out['where']).resolve().is_relative_to(Path(cwd).resolve()), 'imported another copy'
    assert out['sparsity'] == 0.0  # the pure-torch path still serves
    return out


def _library_with_missing_symbol(path):
    """A shared library that fails to load as one built for another torch does: an undefined symbol."""
    cc = shutil.which('cc') or shutil.which('gcc')
    if cc is None:  # still a library that fails to load, with another loader message
        path.write_bytes(b'not an ELF file')
        return
    src = path.with_suffix('.c')
    src.write_text('extern void _ZN3c1015torch_symbol_goneEv(void);\n'
                   'void *PyInit__C(void) { _ZN3c1015torch_symbol_goneEv(); return 0; }\n')
    subprocess.run([cc, '-shared', '-fPIC', '-o', str(path), str(src)], check=True)


def test_library_for_another_torch_warns_with_versions_and_rebuild(tmp_path):
    dst = _copy(tmp_path, {'ext': True, 'cuda': False, 'torch_built_with': '2.99.0+old'})
    _library_with_missing_symbol(dst / ('_C' + SUFFIX))
    out = _ok(_import(tmp_path), tmp_path)
    assert len(out['warnings']) == 1, out
    msg = out['warnings'][0]
    for part in ('failed to load', '2.99.0+old', torch.__version__, 'pip install --no-build-isolation',
                 'pure-torch path'):
        assert part in msg, (part, msg)
    assert out['error'] == msg  # backend_info keeps the reason


def test_source_checkout_shadowing_says_how_to_fix(tmp_path):
    _copy(tmp_path)  # a checkout: setup.py and csrc/ beside the package, no build
    (tmp_path / 'setup.py').write_text('')
    (tmp_path / 'csrc').mkdir()
    out = _ok(_import(tmp_path), tmp_path)
    assert len(out['warnings']) == 1, out
    msg = out['warnings'][0]
    assert 'source checkout' in msg and 'pip install --no-build-isolation -e .' in msg and 'another folder' in msg
    assert 'circular import' not in msg


def test_pure_torch_install_is_silent(tmp_path):
    _copy(tmp_path, {'ext': False})
    out = _ok(_import(tmp_path), tmp_path)
    assert out['warnings'] == [] and 'TORCHUTILS_EXT_NO_EXT=1' in out['error']


def test_require_ext_refuses_to_import_without_the_ops(tmp_path):
    _copy(tmp_path, {'ext': False})
    p = _import(tmp_path, require=True)
    assert p.returncode != 0 and 'TORCHUTILS_EXT_REQUIRE_EXT=1 but the compiled ops are unavailable' in p.stderr


def test_this_run_has_the_ops_it_was_asked_for():
    # CI sets TORCHUTILS_EXT_REQUIRE_EXT=1: the import above would have raised; here the flag is checked against
    # what loaded, so that a run which wanted the compiled ops cannot pass on the pure-torch path
    if os.environ.get('TORCHUTILS_EXT_REQUIRE_EXT') == '1':
        assert _ops.COMPILED and _ops._LOAD_ERROR is None
    else:
        assert _ops.COMPILED == (_ops._LOAD_ERROR is None)


@pytest.mark.skipif(not _ops.COMPILED, reason='checks the message of a compiled install')
def test_backend_info_records_the_build():
    info = torchutils_ext.backend_info()
    assert info['build']['ext'] is True and info['build']['torch_built_with'] == torch.__version__
