"""pytest options and session fixtures for benchmarks/.

    pytest benchmarks/                       full run, models n,s,m,l, CPU, at 1 thread and at torch's default
    pytest benchmarks/ --quick --models n,s  smoke run (fewer repeats; every row still runs and is checked)
    pytest benchmarks/ --threads 1           one thread count only
    pytest benchmarks/ --device cuda

Tables go to the terminal through the terminal reporter (no -s needed) and to benchmarks/results/. Each thread
count is timed in a process of its own (bench_threads.py): this one runs the first, then starts pytest again
for each further count and puts the counts side by side.
"""
import os
import sys
import tempfile

import pytest
import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)  # our helper modules, without a package
sys.path.insert(1, os.path.join(os.path.dirname(_HERE), 'tests'))  # the builders and seed oracle tests share

import bench_threads  # noqa: E402  (first: it reads torch's default thread count before anything sets one)
import harness  # noqa: E402
from bench_report import Report, side_by_side  # noqa: E402

_STATE = {}
# Ultralytics (when installed) builds models from its shipped yaml: no network, settings in a throwaway folder
os.environ.setdefault('YOLO_OFFLINE', '1')
os.environ.setdefault('YOLO_CONFIG_DIR', tempfile.mkdtemp(prefix='yolo-cfg-'))


def pytest_addoption(parser):
    g = parser.getgroup('benchmarks')
    g.addoption('--models', default=None,
                help='comma list of YOLOv5 sizes n,s,m,l,x and, with ultralytics, yaml names '
                     '(default n,s,m,l + yolov8n,yolo11n when ultralytics is importable)')
    g.addoption('--train-models', default=None,
                help='YOLOv5 sizes for the training-step benchmark (default n,s; with --quick n)')
    g.addoption('--quick', action='store_true', help='few repeats: a smoke run that every row executes and agrees')
    g.addoption('--device', default='cpu', choices=('cpu', 'cuda'), help='device to benchmark on')
    g.addoption('--threads', default=None,
                help="comma list of thread counts, each timed in a process of its own: integers, or `default` "
                     "(torch's default: torch.get_num_threads() at start-up, one per core). Default: 1,default on "
                     "CPU, 1 on CUDA")


def pytest_sessionstart(session):
    tr = session.config.pluginmanager.get_plugin('terminalreporter')
    if tr is not None:  # written even under -q, unlike a report header
        tr.write_line(_backend_line(session.config))


def _backend_line(config):
    """One line at the top: the path each op takes, so that a table of "not built" rows cannot pass unnoticed."""
    import torchutils_ext
    info = torchutils_ext.backend_info()
    dev = config.getoption('--device')
    ops = ', '.join(f"{op}: {'compiled' if v[dev] == 'ext' else 'pure torch'}" for op, v in info['ops'].items())
    why = '' if info['compiled'] else f" (compiled ops unavailable: {info['load_error']})"
    return f'torchutils_ext on {dev}: {ops}{why}'


def _models(config):
    opt = config.getoption('--models')
    if opt:
        return [m.strip() for m in opt.split(',') if m.strip()]
    models = ['n', 's', 'm', 'l']
    try:
        import ultralytics  # noqa: F401  real models from its shipped yaml, offline
        models += ['yolov8n', 'yolo11n']
    except Exception:
        pass
    return models


def pytest_generate_tests(metafunc):
    if 'model_name' in metafunc.fixturenames:
        metafunc.parametrize('model_name', _models(metafunc.config))
    if 'train_model' in metafunc.fixturenames:  # steps are long: n and s only unless asked
        opt = metafunc.config.getoption('--train-models') or ('n' if metafunc.config.getoption('--quick') else 'n,s')
        metafunc.parametrize('train_model', [m.strip() for m in opt.split(',') if m.strip()])


class Cfg:
    def __init__(self, config):
        self.quick = config.getoption('--quick')
        self.device = config.getoption('--device')
        self.thread_specs = bench_threads.specs(config.getoption('--threads'), self.device)
        self.threads = self.thread_specs[0]  # this process's count; the others run in processes of their own
        self.repeats, self.warmup = (5, 1) if self.quick else (20, 3)


@pytest.fixture(scope='session')
def cfg(pytestconfig):
    c = Cfg(pytestconfig)
    if c.device == 'cuda' and not torch.cuda.is_available():
        pytest.skip('--device cuda but torch.cuda.is_available() is False')
    bench_threads.apply(c.threads)
    return c


@pytest.fixture(scope='session')
def report(cfg):
    if 'report' not in _STATE:
        r = Report(cfg.device, cfg.quick, harness.machine_info(cfg.device, torch.get_num_threads()),
                   per_count=cfg.device == 'cpu')  # CPU: results/cpu-t<N>.*, and cpu.* side by side
        r.roof = harness.roofline(cfg.device)  # 20 repeats even with --quick: every % depends on it
        _STATE['report'], _STATE['cfg'] = r, cfg
    return _STATE['report']


@pytest.fixture(scope='session')
def flusher(cfg):
    return harness.Flusher(cfg.device)


@pytest.fixture
def build(cfg):
    """build(name) -> eval-mode model on the benchmark device."""
    from bench_models import build_model
    return lambda name: build_model(name).to(cfg.device)


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session):
    """This count's tables, then (in the first process) the runs at the other thread counts."""
    r, cfg = _STATE.get('report'), _STATE.get('cfg')
    if r is None or not r.rows:
        return
    again = harness.roofline(cfg.device)  # the VM's bandwidth drifts: keep the higher (stricter) one
    r.roof_runs = [r.roof, again]
    r.roof = max(r.roof_runs, key=lambda x: x['gb_per_s'])
    r.finalize()
    _STATE['stem'] = r.write()
    others = [] if bench_threads.is_child() else cfg.thread_specs[1:]
    if others:
        tr = session.config.pluginmanager.get_plugin('terminalreporter')
        for spec in others:  # a stale table of that count must not be merged if its run fails
            r.remove_count(bench_threads.resolve(spec))
        failed = bench_threads.run_other_counts(session.config, others, tr.write_line if tr else print)
        if failed:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
        _STATE['combined'] = side_by_side(r, [bench_threads.resolve(s) for s in others], bench_threads.DEFAULT)


def pytest_terminal_summary(terminalreporter):
    r = _STATE.get('report')
    if r is None or not r.rows:
        return
    terminalreporter.write_sep('=', 'torchutils_ext benchmark results')
    combined = _STATE.get('combined')
    if combined:
        terminalreporter.write_line(combined[0])
        terminalreporter.write_line(f'written: {combined[1]}.json, {combined[1]}.md (each count: '
                                    f'{_STATE["stem"]}.md and the other -t<N> files)')
    else:
        terminalreporter.write_line(r.markdown())
        terminalreporter.write_line(f'written: {_STATE["stem"]}.json, {_STATE["stem"]}.md')
