"""Importing the compiled library ``_C``, and saying why when it cannot be used.

Three ways to end up without it, each told apart:
- a pure-torch install (``TORCHUTILS_EXT_NO_EXT=1`` at build time, recorded in ``_build_info``): silent;
- a library that is there but fails to import (typically an undefined symbol after torch was upgraded): one
  warning at import naming the error, the torch it was built for, the torch running, and the rebuild command;
- the source checkout imported instead of the installed package (Python run from the repository root after a
  non-editable ``pip install .``): one warning saying so and how to fix it.
``TORCHUTILS_EXT_REQUIRE_EXT=1`` turns the last two, and a pure-torch install, into an ImportError.
"""
from __future__ import annotations

import importlib
import importlib.machinery
import os
import warnings
from pathlib import Path

import torch

PKG = Path(__file__).resolve().parent
REBUILD = 'pip install --no-build-isolation --no-deps --force-reinstall .  (or -e . for an editable install)'


def build_info() -> dict | None:
    try:
        from ._build_info import BUILD_INFO
    except ImportError:
        return None
    return dict(BUILD_INFO)


def _library_files():
    return [p for s in importlib.machinery.EXTENSION_SUFFIXES for p in PKG.glob('_C' + s)]


def _why(err: Exception, info: dict | None) -> tuple[str, bool]:
    """(reason, whether to warn) for a failed import of _C."""
    files = _library_files()
    if files:
        built = (info or {}).get('torch_built_with', 'an unknown torch')
        return (f'torchutils_ext: the compiled ops in {files[0].name} failed to load ({type(err).__name__}: {err}). '
                f'They were built for torch {built}; torch {torch.__version__} is running. Rebuild them against '
                f'this torch from the torchutils_ext source: {REBUILD}. Until then every op takes the pure-torch '
                'path.'), True
    if (info is not None and not info.get('ext', True)) or os.environ.get('TORCHUTILS_EXT_NO_EXT') == '1':
        return 'pure-torch install (built with TORCHUTILS_EXT_NO_EXT=1)', False
    if (PKG.parent / 'setup.py').is_file() and (PKG.parent / 'csrc').is_dir():
        return (f'torchutils_ext was imported from its source checkout ({PKG.parent}), which holds no compiled '
                'ops. After a non-editable `pip install .` the built package lives in site-packages, and running '
                'Python from the checkout shadows it: run from another folder, or install in place with '
                '`pip install --no-build-isolation -e .`. Until then every op takes the pure-torch path.'), True
    return (f'torchutils_ext has no compiled ops ({type(err).__name__}: {err}); reinstall it with torch installed '
            f'first: {REBUILD}'), True


def load_compiled():
    """(the _C module or None, the reason it is None)."""
    try:
        return importlib.import_module('torchutils_ext._C'), None
    except ImportError as e:
        reason, warn = _why(e, build_info())
    if os.environ.get('TORCHUTILS_EXT_REQUIRE_EXT') == '1':
        raise ImportError(f'TORCHUTILS_EXT_REQUIRE_EXT=1 but the compiled ops are unavailable: {reason}')
    if warn:
        warnings.warn(reason, RuntimeWarning, stacklevel=3)
    return None, reason
