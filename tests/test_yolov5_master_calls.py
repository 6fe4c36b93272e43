"""Every call YOLOv5 master (ultralytics/yolov5 5081342f: models/, utils/, train.py, val.py, classify/, segment/,
detect.py, export.py, hubconf.py, benchmarks.py) makes into ``utils.torch_utils``, in master's own call form,
against torchutils_ext standing in as ``utils.torch_utils``. Master is not on PyPI, so its calls are written out
here (the forms only, no YOLOv5 code); ``test_yolov5_client.py`` runs a real checkout when YOLOV5_DIR is set."""
import logging
import sys
import types
from copy import deepcopy

import pytest
import torch
import torch.nn as nn


@pytest.fixture
def tu(monkeypatch):
    """``utils.torch_utils`` as master's modules import it."""
    import torchutils_ext
    pkg = types.ModuleType('utils')
    pkg.__path__ = []
    monkeypatch.setitem(sys.modules, 'utils', pkg)
    monkeypatch.setitem(sys.modules, 'utils.torch_utils', torchutils_ext)
    from utils import torch_utils
    assert torch_utils is torchutils_ext
    return torch_utils


class Conv(nn.Module):  # the shape of YOLOv5's Conv block (conv, bn, act, forward_fuse)
    def __init__(self, c1, c2, k=1, s=1):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))

    def forward_fuse(self, x):
        return self.act(self.conv(x))


class Detect(nn.Module):
    def __init__(self, nc=3, ch=16):
        super().__init__()
        self.nl, self.nc = 1, nc
        self.m = nn.ModuleList([nn.Conv2d(ch, nc + 5, 1)])

    def forward(self, x):
        return self.m[0](x)


class Model(nn.Module):  # the attributes master's code reads from a DetectionModel
    def __init__(self):
        super().__init__()
        self.model = nn.Sequential(Conv(3, 8, 3, 2), Conv(8, 16, 3, 2), Detect())
        self.stride = torch.tensor([4.0])
        self.yaml = {'nc': 3, 'ch': 3}
        self.names = ['a', 'b', 'c']
        self.hyp, self.nc, self.class_weights = {'box': 0.05}, 3, torch.ones(3)

    def forward(self, x):
        return self.model(x)


def test_models_yolo(tu, caplog):
    """models/yolo.py: time_sync, fuse_conv_and_bn, model_info, initialize_weights, scale_img, select_device,
    profile."""
    model, x = Model(), torch.randn(1, 3, 32, 32)
    t = tu.time_sync()
    _ = model(x)
    assert (tu.time_sync() - t) * 100 >= 0
    tu.initialize_weights(model)
    assert model.model[0].bn.eps == 1e-3 and model.model[0].act.inplace
    model.eval()
    ref = model(x)
    for m in model.modules():  # Model.fuse()
        if isinstance(m, Conv) and hasattr(m, 'bn'):
            m.conv = tu.fuse_conv_and_bn(m.conv, m.bn)
            delattr(m, 'bn')
            m.forward = m.forward_fuse
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)
    verbose, img_size = False, 640
    with caplog.at_level(logging.INFO):
        tu.model_info(model, detailed=verbose, imgsz=img_size)  # Model.info(), the call that once broke
    assert 'summary' in caplog.text and 'GFLOPs' in caplog.text
    fi, si = 3, 0.83
    xi = tu.scale_img(x.flip(fi) if fi else x, si, gs=int(model.stride.max()))
    assert xi.shape[-1] % 4 == 0
    device = tu.select_device('cpu')
    results = tu.profile(input=x.to(device), ops=[model], n=3)
    assert len(results) == 1 and results[0] is not None


def test_models_common(tu):
    """models/common.py: copy_attr (AutoShape), smart_inference_mode, smart_amp_autocast(autocast)."""
    src, dst = Model(), types.SimpleNamespace()
    tu.copy_attr(dst, src, include=('yaml', 'nc', 'hyp', 'names', 'stride', 'abc'), exclude=())
    assert dst.names == src.names and not hasattr(dst, 'abc')

    @tu.smart_inference_mode()
    def forward(x):
        autocast = False
        with tu.smart_amp_autocast(autocast):
            return x * 2
    assert forward(torch.ones(1)).is_inference()


def test_train_py(tu, tmp_path):
    """train.py / segment/train.py: select_device, torch_distributed_zero_first, smart_optimizer, ModelEMA,
    smart_resume, de_parallel, EarlyStopping, smart_amp_autocast."""
    LOCAL_RANK, RANK = -1, -1
    device = tu.select_device('cpu', batch_size=16)
    with tu.torch_distributed_zero_first(LOCAL_RANK):
        model = Model().to(device)
    hyp = {'lr0': 0.01, 'momentum': 0.937, 'weight_decay': 5e-4}
    optimizer = tu.smart_optimizer(model, 'SGD', hyp['lr0'], hyp['momentum'], hyp['weight_decay'])
    assert [g['weight_decay'] for g in optimizer.param_groups] == [0.0, 5e-4, 0.0]
    ema = tu.ModelEMA(model) if RANK in {-1, 0} else None
    nl = tu.de_parallel(model).model[-1].nl
    assert nl == 1
    stopper, stop = tu.EarlyStopping(patience=100), False
    amp = False
    for epoch in range(2):
        with tu.smart_amp_autocast(amp):
            loss = model(torch.randn(2, 3, 32, 32)).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        ema.update(model)
        ema.update_attr(model, include=['yaml', 'nc', 'hyp', 'names', 'stride', 'class_weights'])
        stop = stopper(epoch=epoch, fitness=0.1 * epoch)
    assert not stop and ema.updates == 2 and ema.ema.names == model.names
    ckpt = {'epoch': 1, 'best_fitness': 0.1, 'model': deepcopy(tu.de_parallel(model)).half(),
            'ema': deepcopy(ema.ema).half(), 'updates': ema.updates, 'optimizer': optimizer.state_dict()}
    torch.save(ckpt, tmp_path / 'last.pt')
    ckpt = torch.load(tmp_path / 'last.pt', weights_only=False)
    weights, epochs, resume = str(tmp_path / 'last.pt'), 3, True
    ema2 = tu.ModelEMA(Model())
    best_fitness, start_epoch, epochs = tu.smart_resume(ckpt, optimizer, ema2, weights, epochs, resume)
    assert (best_fitness, start_epoch, epochs, ema2.updates) == (0.1, 2, 3, 2)


def test_classify_train(tu, caplog):
    """classify/train.py and classify/val.py."""
    LOCAL_RANK = -1
    with tu.torch_distributed_zero_first(LOCAL_RANK):
        pass
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 1000))
    nc = 5
    tu.reshape_classifier_output(model, nc)
    assert model[-1].out_features == nc
    with caplog.at_level(logging.INFO):
        tu.model_info(model)
    assert 'summary' in caplog.text
    optimizer = tu.smart_optimizer(model, 'Adam', 0.001, momentum=0.9, decay=5e-5)
    assert len(optimizer.param_groups) == 3
    ema = tu.ModelEMA(model)
    criterion = tu.smartCrossEntropyLoss(label_smoothing=0.1)
    cuda = False
    with tu.smart_amp_autocast(cuda):
        loss = criterion(model(torch.randn(2, 3, 8, 8)), torch.tensor([0, 1]))
    loss.backward()
    ema.update(model)
    device = torch.device('cpu')
    with tu.smart_amp_autocast(device.type != 'cpu'):
        pass
    assert tu.select_device('cpu', batch_size=4) == device
    assert deepcopy(ema.ema).half()[-1].weight.dtype is torch.float16


def test_utils_and_entry_points(tu):
    """utils/__init__.py, utils/autobatch.py, utils/dataloaders.py, utils/loss.py, utils/loggers, val.py, detect.py,
    export.py, hubconf.py, benchmarks.py, segment/val.py."""
    tu.select_device(newline=False)  # utils/__init__.py notebook_init
    model = Model()
    amp = False
    with tu.smart_amp_autocast(amp):  # autobatch.check_train_batch_size
        pass
    img = [torch.empty(b, 3, 32, 32) for b in (1, 2)]
    results = tu.profile(img, model, n=3, device=torch.device('cpu'))  # autobatch.autobatch
    assert len(results) == 2 and all(r is not None for r in results)
    with tu.torch_distributed_zero_first(-1):  # dataloaders.create_dataloader
        pass
    assert isinstance(tu.de_parallel(model).model[-1], Detect)  # loss.ComputeLoss
    traced = torch.jit.trace(tu.de_parallel(model), torch.zeros(1, 3, 32, 32), strict=False)  # loggers
    assert traced is not None
    for device in ('cpu', ''):  # val.py / detect.py / export.py / hubconf / benchmarks
        assert isinstance(tu.select_device(device), torch.device)
    assert tu.select_device('cpu', batch_size=32) == torch.device('cpu')

    @tu.smart_inference_mode()
    def run():
        return torch.is_inference_mode_enabled()
    assert run()
