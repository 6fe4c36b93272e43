"""Both call forms: every name shared with Ultralytics 8.x's ``ultralytics.utils.torch_utils`` (which YOLOv5 master
re-exports from its utils/torch_utils.py) accepts every keyword Ultralytics accepts, and those keyword forms do
what Ultralytics' do wherever the seed's contract does not say otherwise."""
import inspect
import logging
import time

import pytest
import torch
import torch.nn as nn
from client_packages import need

import torchutils_ext as tx

# Ultralytics' name -> ours, where they differ (YOLOv5 master: `autocast as smart_amp_autocast`)
RENAMED = {'autocast': 'smart_amp_autocast'}
METHODS = ('__init__', '__call__', 'update', 'update_attr')


def _keywords(fn):
    """Parameter names a caller may pass by keyword (self excluded)."""
    ps = inspect.signature(fn).parameters.values()
    return [p.name for p in ps if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != 'self']


def _accepts(fn, name):
    ps = inspect.signature(fn).parameters
    return (name in ps and ps[name].kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
            ) or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in ps.values())


def _shared():
    utu = need('ultralytics.utils.torch_utils')
    pairs = [(n, RENAMED.get(n, n)) for n in dir(utu) if not n.startswith('_')]
    pairs = [(u, o) for u, o in pairs if o in tx.__all__ and callable(getattr(utu, u))]
    return utu, pairs


def test_shared_names_accept_every_ultralytics_keyword():
    utu, pairs = _shared()
    names = {o for _, o in pairs}
    # the names YOLOv5 master takes from Ultralytics must be among them, or this test checks too little
    assert {'model_info', 'time_sync', 'copy_attr', 'initialize_weights', 'is_parallel', 'scale_img',
            'smart_amp_autocast', 'select_device', 'ModelEMA', 'EarlyStopping'} <= names
    refused = []
    for u, o in pairs:
        theirs, ours = getattr(utu, u), getattr(tx, o)
        fns = [(m, getattr(theirs, m), getattr(ours, m)) for m in METHODS if inspect.isclass(theirs)
               and m in vars(theirs)] if inspect.isclass(theirs) else [('', theirs, ours)]
        for m, f_theirs, f_ours in fns:
            refused += [f'{o}{"." + m if m else ""}({k}=)' for k in _keywords(f_theirs) if not _accepts(f_ours, k)]
    assert not refused, f'keywords Ultralytics accepts and we refuse: {refused}'


def test_signature_check_catches_a_missing_keyword():
    # the check above must be able to fail: a function without `imgsz` is reported
    def model_info(model, verbose=False, img_size=640):
        pass
    assert not _accepts(model_info, 'imgsz') and _accepts(tx.model_info, 'imgsz')


class _Net(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.SiLU(), nn.Conv2d(8, 4, 1))


def test_model_info_both_forms(caplog, capsys):
    m = _Net()
    with caplog.at_level(logging.INFO, logger='torchutils_ext'):
        seed_form = tx.model_info(m, False, 64)
        kw_form = tx.model_info(m, detailed=False, imgsz=64)
    lines = [r.getMessage() for r in caplog.records if 'summary' in r.getMessage()]
    assert len(lines) == 2 and lines[0] == lines[1]  # the seed's verbose=False still logs the summary
    n_p = sum(p.numel() for p in m.parameters())
    assert seed_form == kw_form and seed_form[:3] == (4, n_p, n_p)  # 4 leaf modules, as Ultralytics counts
    assert isinstance(seed_form[3], float) and seed_form[3] > 0
    assert capsys.readouterr().out == ''  # no per-parameter table
    tx.model_info(m, detailed=True)
    table = capsys.readouterr().out
    assert 'gradient' in table and len(table.splitlines()) == 1 + len(list(m.parameters()))
    tx.model_info(m, True)  # the seed's positional verbose: the same table
    assert capsys.readouterr().out == table


def test_model_info_imgsz_scales_and_wins():
    m = _Net()
    g64 = tx.model_info(m, imgsz=64)[3]
    assert tx.model_info(m, img_size=32, imgsz=(64, 128))[3] == pytest.approx(2 * g64, rel=1e-6)
    assert tx.model_info(m, img_size=[64, 64])[3] == pytest.approx(g64, rel=1e-6)


def test_time_sync_device_keyword():
    a = tx.time_sync(device=torch.device('cpu'))
    b = tx.time_sync('cpu')
    assert isinstance(a, float) and a <= b <= time.time()


def test_select_device_verbose_keyword(caplog):
    with caplog.at_level(logging.INFO, logger='torchutils_ext'):
        assert tx.select_device('cpu', newline=False, verbose=False) == torch.device('cpu')
    assert not [r for r in caplog.records if 'CPU' in r.getMessage()]
    with caplog.at_level(logging.INFO, logger='torchutils_ext'):
        tx.select_device('cpu', newline=False)
    assert [r for r in caplog.records if r.getMessage().endswith('CPU')]


def test_smart_inference_mode_keyword():
    @tx.smart_inference_mode()
    def inside():
        return torch.is_inference_mode_enabled(), torch.is_grad_enabled()

    @tx.smart_inference_mode(mode=False)
    def outside():
        return torch.is_inference_mode_enabled(), torch.is_grad_enabled(), torch.ones(2)

    assert inside() == (True, False)
    with torch.inference_mode():
        inf, grad, t = outside()
    assert (inf, grad) == (False, False) and not t.is_inference()
    assert outside.__name__ == 'outside'


def test_smart_amp_autocast_keywords():
    with tx.smart_amp_autocast(enabled=True, device='cpu'):
        assert torch.is_autocast_enabled('cpu')
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype is torch.bfloat16
    with tx.smart_amp_autocast(enabled=torch.bfloat16, device='cpu'):
        assert torch.get_autocast_dtype('cpu') is torch.bfloat16
    with tx.smart_amp_autocast(False, device='cpu'):
        assert not torch.is_autocast_enabled('cpu')
    if not torch.cuda.is_available():
        with tx.smart_amp_autocast(True):  # CUDA asked for without CUDA: off, silently
            assert not torch.is_autocast_enabled('cuda')


def test_early_stopping_none_fitness():
    es = tx.EarlyStopping(patience=3)
    assert es(0, 0.5) is False
    assert es(1, None) is False and es.best_epoch == 0  # no validation this epoch: nothing changes
    assert es(2, 0.4) is False and es(3, 0.3) is True
