"""torchutils_ext.ultralytics in this process: the hooks, UltralyticsEMA's contract, and the batched
``BaseModel.fuse`` against Ultralytics' own on their yaml models and a model with every block their fuse knows.
(Real training runs, DDP and checkpoints: test_ultralytics_training.py.)"""
import copy
import logging
import pickle

import pytest
import torch
import torch.nn as nn
from client_packages import need
from model_checks import flatten_outputs, randomize_model_bn, rel_err

tasks = need('ultralytics.nn.tasks')
utu = need('ultralytics.utils.torch_utils')
trainer_module = need('ultralytics.engine.trainer')
callbacks = need('ultralytics.utils.callbacks')
ul = need('torchutils_ext.ultralytics')
from torchutils_ext import _ultralytics_fuse  # noqa: E402

STOCK_FUSE = tasks.BaseModel.__dict__['fuse']
STOCK_EMA = utu.ModelEMA
YAMLS = [(tasks.DetectionModel, 'yolov8n.yaml'), (tasks.SegmentationModel, 'yolov8n-seg.yaml'),
         (tasks.DetectionModel, 'yolov10n.yaml'), (tasks.DetectionModel, 'yolo26n.yaml'),
         (tasks.DetectionModel, 'yolov9t.yaml')]


@pytest.fixture
def enabled():
    yield ul.enable_for_ultralytics(skip_nonfinite=True)
    ul.disable_for_ultralytics()


class Blocks(tasks.BaseModel):
    """Every block BaseModel.fuse treats, and pairs our batch must leave to their per-pair fold."""

    def __init__(self, shared=False):
        super().__init__()
        from ultralytics.nn.modules import Conv, Conv2, ConvTranspose, DWConv, RepConv
        from ultralytics.nn.modules.block import RepVGGDW
        first = Conv(8, 8, 3)
        twin = Conv(8, 8, 3)
        if shared:  # one nn.Conv2d in two blocks: theirs folds it twice (the result computes neither block)
            twin.conv = first.conv
        plain_bn = Conv(8, 8, 1)
        plain_bn.bn = nn.BatchNorm2d(8, affine=False)
        self.model = nn.Sequential(Conv(3, 8, 3, 2), Conv2(8, 8), DWConv(8, 8, 3), ConvTranspose(8, 8),
                                   ConvTranspose(8, 8, bn=False), RepConv(8, 8, bn=True), RepVGGDW(8), first, twin,
                                   plain_bn, nn.Conv2d(8, 4, 1))

    def forward(self, x):
        return self.model(x)


def _build(cls, yaml):
    torch.manual_seed(0)
    model = cls(shared=yaml == 'shared') if cls is Blocks else cls(yaml, verbose=False)
    return randomize_model_bn(model).eval()


def _structure(model):
    return [(n, type(m).__name__, 'forward' in m.__dict__) for n, m in model.named_modules(remove_duplicate=False)]


@pytest.mark.parametrize('cls,yaml', YAMLS + [(Blocks, 'blocks')], ids=[y for _, y in YAMLS] + ['blocks'])
def test_fuse_same_pairs_and_outputs(cls, yaml, monkeypatch):
    model = _build(cls, yaml)
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    calls = []
    real = _ultralytics_fuse._ops.fold_conv_bn
    monkeypatch.setattr(_ultralytics_fuse._ops, 'fold_conv_bn', lambda *a, **k: calls.append(len(a[0])) or real(*a, **k))
    with torch.no_grad():
        ref = flatten_outputs(copy.deepcopy(model).double()(x.double()))
        theirs = STOCK_FUSE(copy.deepcopy(model), verbose=False)
        ours = _ultralytics_fuse.fuse(copy.deepcopy(model), verbose=False)
        got, want = flatten_outputs(ours(x)), flatten_outputs(theirs(x))
    assert _structure(ours) == _structure(theirs)  # same blocks fused, same BNs gone, same forward switches
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=2e-6, atol=1e-6, msg=lambda m: f'{k}: {m}')
    assert [p.requires_grad for p in ours.parameters()] == [p.requires_grad for p in theirs.parameters()]
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert rel_err(g, w) <= 1e-5
    # the predictions (the first output; fusing an end-to-end head drops its unused branch's raw outputs)
    assert rel_err(got[0], ref[0]) <= 1e-5, 'fused output differs from the float64 unfused model'
    # every block that fuse() switched to forward_fuse had its pair folded: by us in the one call, except in
    # Blocks the BN-less ConvTranspose, which their per-pair code takes
    switched = sum(isinstance(m, (tasks.Conv, tasks.ConvTranspose)) and 'forward' in m.__dict__
                   for m in theirs.modules())
    assert calls == [switched - (cls is Blocks)], (calls, switched)


def test_fuse_shared_layer_takes_their_fold(monkeypatch):
    model = _build(Blocks, 'shared')
    theirs_calls = []
    real = tasks.fuse_conv_and_bn
    monkeypatch.setattr(tasks, 'fuse_conv_and_bn', lambda c, b: theirs_calls.append(id(c)) or real(c, b))
    stock = STOCK_FUSE(copy.deepcopy(model), verbose=False)
    ours = _ultralytics_fuse.fuse(model, verbose=False)
    shared = ours.model[7].conv
    assert ours.model[8].conv is shared
    assert theirs_calls.count(id(shared)) == 2  # folded twice, as theirs does, by their function
    torch.testing.assert_close(ours.state_dict(), stock.state_dict(), rtol=2e-6, atol=1e-6)


def test_fuse_inference_tensors_and_refuse_twice():
    model = _build(tasks.DetectionModel, 'yolov8n.yaml')
    with torch.inference_mode():
        loaded = copy.deepcopy(model)  # as a checkpoint loaded inside inference mode
    assert loaded.model[0].conv.weight.is_inference()
    with torch.no_grad():
        ours = _ultralytics_fuse.fuse(loaded, verbose=False)
        theirs = STOCK_FUSE(copy.deepcopy(model), verbose=False)
    torch.testing.assert_close(ours.state_dict(), theirs.state_dict(), rtol=2e-6, atol=1e-6)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    _ultralytics_fuse.fuse(ours, verbose=False)  # is_fused(): nothing left to do
    assert all(torch.equal(before[k], v) for k, v in ours.state_dict().items())


def test_fuse_quantized_model_goes_to_theirs(enabled, monkeypatch):
    class TensorQuantizer(nn.Module):  # what is_qat looks for, by class name
        pass
    model = _build(tasks.DetectionModel, 'yolov8n.yaml')
    model.model[0].q = TensorQuantizer()
    seen = []
    monkeypatch.setattr(_ultralytics_fuse, 'STOCK', lambda m, **k: seen.append(k) or m)
    assert model.fuse(verbose=False, imgsz=320) is model and seen == [{'verbose': False, 'imgsz': 320}]


def test_fuse_logs_the_summary_as_theirs(monkeypatch):
    infos = []
    monkeypatch.setattr(tasks.BaseModel, 'info', lambda self, **k: infos.append(k))
    _ultralytics_fuse.fuse(_build(tasks.DetectionModel, 'yolov8n.yaml'), imgsz=320)
    STOCK_FUSE(_build(tasks.DetectionModel, 'yolov8n.yaml'), imgsz=320)
    assert infos == [{'verbose': True, 'imgsz': 320}] * 2


def test_enable_patches_and_disable_restores():
    integration = ul.enable_for_ultralytics(skip_nonfinite=True)
    try:
        assert tasks.BaseModel.fuse is _ultralytics_fuse.fuse
        ema = trainer_module.ModelEMA(_build(tasks.DetectionModel, 'yolov8n.yaml'))
        assert type(ema) is ul.UltralyticsEMA and ema.skip_nonfinite and ema.mode == 'lerp'
        assert integration in callbacks.default_callbacks['on_pretrain_routine_end']
        again = ul.enable_for_ultralytics(fuse=False)  # replaces the settings
        assert tasks.BaseModel.__dict__['fuse'] is STOCK_FUSE
        assert not trainer_module.ModelEMA(nn.Linear(2, 2)).skip_nonfinite
        regs = callbacks.default_callbacks['on_pretrain_routine_end']
        assert again in regs and integration not in regs
        # the callbacks travel to DDP workers by pickling (cloudpickle there; plain pickle works too)
        copied = pickle.loads(pickle.dumps(callbacks.get_default_callbacks()))
        assert any(isinstance(c, ul.Integration) for c in copied['on_pretrain_routine_end'])
    finally:
        ul.disable_for_ultralytics()
    assert trainer_module.ModelEMA is STOCK_EMA and tasks.BaseModel.__dict__['fuse'] is STOCK_FUSE
    assert not any(isinstance(c, ul.Integration) for c in callbacks.default_callbacks['on_pretrain_routine_end'])


def test_callback_converts_a_stock_ema():
    model = _build(tasks.DetectionModel, 'yolov8n.yaml')
    stock = STOCK_EMA(model)
    stock.updates = 5
    trainer = type('T', (), {'ema': stock})()
    try:
        ul.Integration(skip_nonfinite=True)(trainer)  # what a DDP worker's first EMA goes through
        assert trainer_module.ModelEMA is not STOCK_EMA  # and later rebuilds in that process are ours
    finally:
        ul.disable_for_ultralytics()
    ema = trainer.ema
    assert type(ema) is ul.UltralyticsEMA and ema.updates == 5 and ema.skip_nonfinite
    assert all(torch.equal(a, b) for a, b in zip(ema.ema.state_dict().values(), stock.ema.state_dict().values()))
    odd = STOCK_EMA(model, decay=0.99)
    with pytest.raises(ValueError, match='decay ramp'):
        ul.UltralyticsEMA.from_stock(odd)


@pytest.mark.parametrize('what', ['setup', 'resume', 'name', 'signature', 'fuse'])
def test_missing_hook_fails_loudly(what, monkeypatch):
    if what in ('setup', 'resume'):
        name = {'setup': '_setup_train', 'resume': '_load_checkpoint_state'}[what]
        monkeypatch.setattr(trainer_module.BaseTrainer, name, lambda self, *a: None)
        match = name
    elif what == 'name':
        monkeypatch.setattr(trainer_module, 'ModelEMA', type('OtherEMA', (), {}))
        match = 'engine.trainer.ModelEMA'
    elif what == 'signature':
        monkeypatch.setattr(utu.ModelEMA, '__init__', lambda self, model, decay=0.9999: None)
        match = 'ModelEMA takes'
    else:
        monkeypatch.setattr(tasks.BaseModel, 'fuse', lambda self, verbose=True, imgsz=640, extra=None: self.more())
        match = 'fuse=False'
    with pytest.raises(RuntimeError, match=match):
        ul.enable_for_ultralytics()
    assert trainer_module.ModelEMA is not None and not ul._saved  # nothing was patched
    if what == 'fuse':
        ul.enable_for_ultralytics(fuse=False)  # their fuse kept, the EMA still ours
        ul.disable_for_ultralytics()


def _steps(model, emas, n=6, nan_at=None):
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    model.train()
    for i in range(n):
        loss = sum(o.float().pow(2).mean() for o in flatten_outputs(model(x)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        w = model.model[0].conv.weight
        keep = w.detach()[0, 0, 0, 0].item()
        if i == nan_at:
            with torch.no_grad():
                w[0, 0, 0, 0] = float('inf')
        for update in emas:
            update(model)
        with torch.no_grad():
            w[0, 0, 0, 0] = keep


def _close_float_state(a, b):
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        if x.is_floating_point():
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7, msg=lambda m: f'{k}: {m}')


class Wrapper(nn.Module):
    """A DP/DDP-style wrapper (``.module``), which their unwrap_model strips."""

    def __init__(self, module):
        super().__init__()
        self.module = module


@pytest.mark.parametrize('wrap', ['plain', 'compiled', 'wrapper'])
def test_ema_contract_matches_theirs(wrap):
    model = _build(tasks.DetectionModel, 'yolov8n.yaml')
    wrapped = {'plain': model, 'compiled': torch.compile(model), 'wrapper': Wrapper(model)}[wrap]
    theirs, ours = STOCK_EMA(wrapped), ul.UltralyticsEMA(wrapped)
    assert type(ours.ema) is tasks.DetectionModel and ours.mode == 'lerp' and ours.enabled
    _steps(model, [lambda m: theirs.update(wrapped), lambda m: ours.update(wrapped)])
    assert ours.updates == theirs.updates == 6
    _close_float_state(ours.ema, theirs.ema)
    model.extra, model._private, model.stride2 = 1, 2, 3
    ours.update_attr(wrapped, include=['extra', '_private'])  # their call form; private names never copied
    assert ours.ema.extra == 1 and not hasattr(ours.ema, '_private') and not hasattr(ours.ema, 'stride2')
    model.process_group = 'pg'
    ours.update_attr(wrapped)  # their exclude default is (): everything public
    assert ours.ema.process_group == 'pg' and ours.ema.stride2 == 3


def test_ema_enabled_flag_and_teacher():
    student = _build(tasks.DetectionModel, 'yolov8n.yaml')
    student.teacher_model = nn.Conv2d(3, 3, 1)  # a distillation model carries its teacher
    ours, theirs = ul.UltralyticsEMA(student), STOCK_EMA(student)
    assert ours.ema.teacher_model is None and theirs.ema.teacher_model is None
    assert ours.ema.state_dict().keys() == theirs.ema.state_dict().keys()
    ours.enabled = theirs.enabled = False
    before = copy.deepcopy(ours.ema.state_dict())
    _steps(student, [ours.update, theirs.update], n=2)
    student.extra = 1
    ours.update_attr(student)
    assert ours.updates == theirs.updates == 0 and not hasattr(ours.ema, 'extra')
    assert all(torch.equal(before[k], v) for k, v in ours.ema.state_dict().items())
    ours.enabled = theirs.enabled = True
    _steps(student, [ours.update, theirs.update], n=2)
    assert ours.updates == theirs.updates == 2
    _close_float_state(ours.ema, theirs.ema)


def test_ema_skips_a_nonfinite_step():
    model = _build(tasks.DetectionModel, 'yolov8n.yaml')
    guarded, theirs = ul.UltralyticsEMA(model, skip_nonfinite=True), STOCK_EMA(model)
    ref, calls = ul.UltralyticsEMA(model), []

    def ref_update(m):  # the same updates with the 3rd one left out and the counter advanced
        calls.append(m)
        if len(calls) == 3:
            ref.updates += 1
        else:
            ref.update(m)
    _steps(model, [guarded.update, theirs.update, ref_update], n=5, nan_at=2)
    assert guarded.skipped == 1 and guarded.updates == ref.updates == 5
    assert all(torch.equal(a, b) for a, b in zip(guarded.ema.state_dict().values(), ref.ema.state_dict().values()))
    assert torch.isfinite(guarded.ema.model[0].conv.weight).all()
    assert not torch.isfinite(theirs.ema.model[0].conv.weight).all()  # theirs keeps it until save_model


def test_untested_version_warns_once(monkeypatch, caplog):
    monkeypatch.setattr(need('ultralytics'), '__version__', '8.4.999')
    monkeypatch.setattr(ul, '_warned', [])
    with caplog.at_level(logging.WARNING, logger='torchutils_ext'):
        try:
            ul.enable_for_ultralytics()
            ul.enable_for_ultralytics()
        finally:
            ul.disable_for_ultralytics()
    assert caplog.text.count(f'tested with ultralytics {ul.TESTED_VERSION}, running 8.4.999') == 1
