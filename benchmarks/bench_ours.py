"""Access to torchutils_ext for the benchmarks: which of our backends can run here, and why not.

Our rows are benchmarked twice: 'torch' (our pure-torch path) and 'ext' (the compiled op). The compiled row
is shown as "not built" (not run, not failed) when backend_info() says the extension isn't compiled, or
when the op has no kernel for this device.
"""
import contextlib

try:
    import torchutils_ext as tx
    IMPORT_ERROR = ''
except Exception as e:  # report it in the table rather than crash the whole run
    tx, IMPORT_ERROR = None, f'torchutils_ext not importable: {type(e).__name__}: {e}'


def backends(op, device):
    """[(row label suffix, backend name or None, reason)] for our pure-torch and compiled rows of `op`."""
    if tx is None:
        return [('pure torch', None, IMPORT_ERROR), ('compiled', None, IMPORT_ERROR)]
    try:
        info = tx.backend_info()
    except Exception as e:
        return [('pure torch', 'torch', ''), ('compiled', None, f'backend_info() failed: {e}')]
    dev = 'cuda' if str(device).startswith('cuda') else 'cpu'
    compiled = info.get('cuda_compiled' if dev == 'cuda' else 'compiled')
    kernel = info.get('ops', {}).get(op, {}).get(dev)
    if not info.get('compiled'):
        why = 'not built'
    elif not compiled:
        why = f'not built for {dev}'
    elif kernel not in (None, 'ext'):
        why = f'no {dev} kernel for {op} (auto uses {kernel})'
    else:
        why = ''
    return [('pure torch', 'torch', ''), ('compiled', None if why else 'ext', why)]


def using(backend):
    """Context forcing our backend (no-op when the API isn't there yet). For untimed code: entering it after a
    cache flush measured ~50 us, 5-8% of a yolov5n EMA update, which no peer pays."""
    if tx is None or not hasattr(tx, 'use_backend'):
        return contextlib.nullcontext()
    return tx.use_backend(backend)


def setup(role, backend, then=None):
    """A row's untimed setup: for our rows, select our backend (one module global) first; then `then()` (the
    cache flush, a fresh model copy). The timed call is then exactly what a user calls. Run timings inside
    `restoring_backend()`."""
    if role != 'ours' or tx is None or not hasattr(tx, 'set_backend'):
        return then

    def run():
        tx.set_backend(backend)
        if then is not None:
            then()
    return run


@contextlib.contextmanager
def restoring_backend():
    prev = tx.get_backend() if tx is not None and hasattr(tx, 'get_backend') else None
    try:
        yield
    finally:
        if prev is not None:
            tx.set_backend(prev)
