"""The few ``utils.general`` helpers the seed imports, so no YOLOv5 checkout is needed."""
import logging
import os
import re
import subprocess
from datetime import datetime
from pathlib import Path

LOGGER = logging.getLogger('torchutils_ext')


class _OnlyWithoutRootHandlers(logging.Filter):
    # Print through our own handler only while the application has not configured root logging;
    # otherwise the record propagates to root and would show twice.
    def filter(self, record):
        return not logging.getLogger().handlers


if not LOGGER.handlers:  # never touch the root logger; one plain handler so INFO lines show like YOLOv5's
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter('%(message)s'))
    _handler.addFilter(_OnlyWithoutRootHandlers())
    LOGGER.addHandler(_handler)
    if LOGGER.level == logging.NOTSET:  # respect a level the user already chose
        LOGGER.setLevel(logging.INFO if int(os.getenv('RANK', -1)) in (-1, 0) else logging.WARNING)

_COLORS = {
    'black': '\033[30m', 'red': '\033[31m', 'green': '\033[32m', 'yellow': '\033[33m', 'blue': '\033[34m',
    'magenta': '\033[35m', 'cyan': '\033[36m', 'white': '\033[37m',
    'bright_black': '\033[90m', 'bright_red': '\033[91m', 'bright_green': '\033[92m', 'bright_yellow': '\033[93m',
    'bright_blue': '\033[94m', 'bright_magenta': '\033[95m', 'bright_cyan': '\033[96m', 'bright_white': '\033[97m',
    'end': '\033[0m', 'bold': '\033[1m', 'underline': '\033[4m'}


def colorstr(*input):
    """ANSI-colour the last argument with the styles named before it; one argument means blue bold."""
    *styles, text = input if len(input) > 1 else ('blue', 'bold', input[0])
    return ''.join(_COLORS[s] for s in styles) + f'{text}' + _COLORS['end']


def _parse_version(v):
    try:
        from packaging.version import Version
        return Version(str(v))
    except ImportError:  # no packaging: compare the leading numeric release parts
        return tuple(int(x) for x in re.findall(r'\d+', str(v).split('+')[0])[:4])


def check_version(current='0.0.0', minimum='0.0.0', name='version ', pinned=False, hard=False, verbose=False):
    """True when ``current`` >= ``minimum`` (== when pinned). ``hard`` raises RuntimeError instead of returning."""
    cur, low = _parse_version(current), _parse_version(minimum)
    result = (cur == low) if pinned else (cur >= low)
    if not result:
        s = f'WARNING ⚠️ {name}{minimum} is required, but {name}{current} is currently installed'
        if hard:
            raise RuntimeError(s)
        if verbose:
            LOGGER.warning(s)
    return result


def git_describe(path=Path(__file__).resolve().parents[1]):
    """``git describe`` of a checkout, '' when not a git repo or git is missing/slow. Never raises."""
    try:
        if not (Path(path) / '.git').exists():
            return ''
        out = subprocess.run(['git', '-C', str(path), 'describe', '--tags', '--long', '--always'],
                             capture_output=True, timeout=2, check=True)
        return out.stdout.decode().strip()
    except Exception:
        return ''


def file_date(path=__file__):
    """Modification date of a file, e.g. '2021-3-26' (no zero padding, like YOLOv5)."""
    t = datetime.fromtimestamp(Path(path).stat().st_mtime)
    return f'{t.year}-{t.month}-{t.day}'
