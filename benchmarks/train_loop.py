"""YOLOv5's training step, in this process, with a chosen ``torch_utils``: the seed (the ``yolov5`` PyPI package's
own ``yolov5.utils.torch_utils``, YOLOv5 v7.0) or ours. No pytest here.

The model (``yolov5.models.yolo.Model`` from the package's yaml), the loss (``ComputeLoss``, hyperparameters from
``hyp.scratch-low.yaml`` scaled as ``train.py`` scales them) and the step are YOLOv5's: uint8 images to float / 255,
forward and loss under ``autocast(enabled=amp)``, backward, ``clip_grad_norm_(max_norm=10)``, optimizer step,
``zero_grad``, then ``ema.update(model)``. One optimizer step per batch (``accumulate`` = 1, as at a nominal batch
of 64). The two sides differ only in the ``torch_utils`` they call: ``smart_optimizer`` and ``ModelEMA`` every
run, and the per-epoch calls in ``epoch_calls``.
"""
import contextlib
import importlib
import importlib.util
import os
import tempfile
import time
import warnings
from copy import deepcopy
from pathlib import Path

import torch

import harness

# what train.py copies onto the EMA each epoch
UPDATE_ATTR = ['yaml', 'nc', 'hyp', 'names', 'stride', 'class_weights']


def import_yolov5():
    """(seed torch_utils module, yolov5.models.yolo, ComputeLoss, package root), or raise ImportError.

    Offline: Ultralytics (imported by yolov5.utils.general) and YOLOv5 keep their settings in throwaway folders.
    The seed's module silences every UserWarning when imported; the filters are restored after."""
    if importlib.util.find_spec('yolov5') is None:
        raise ImportError('the yolov5 package (YOLOv5 v7.0) is not installed')
    for var in ('YOLO_CONFIG_DIR', 'YOLOV5_CONFIG_DIR'):
        os.environ.setdefault(var, tempfile.mkdtemp(prefix='y5-cfg-'))
    os.environ.setdefault('YOLO_OFFLINE', '1')
    with warnings.catch_warnings():
        seed_tu = importlib.import_module('yolov5.utils.torch_utils')
        yolo = importlib.import_module('yolov5.models.yolo')
        loss = importlib.import_module('yolov5.utils.loss')
    return seed_tu, yolo, loss.ComputeLoss, Path(yolo.__file__).parent.parent


def build_model(yolo, root, size, imgsz, device, nc=80):
    """yolov5{size} from the package's yaml with train.py's hyperparameters attached (what ComputeLoss reads)."""
    import yaml
    torch.manual_seed(0)
    with contextlib.redirect_stdout(None):
        model = yolo.Model(str(root / 'models' / f'yolov5{size}.yaml'), ch=3, nc=nc).to(device)
    hyp = yaml.safe_load((root / 'data' / 'hyps' / 'hyp.scratch-low.yaml').read_text())
    nl = model.model[-1].nl  # train.py scales the loss gains to the layers, classes and image size
    hyp['box'] *= 3 / nl
    hyp['cls'] *= nc / 80 * 3 / nl
    hyp['obj'] *= (imgsz / 640) ** 2 * 3 / nl
    hyp['label_smoothing'] = 0.0
    model.nc, model.hyp, model.names = nc, hyp, [str(i) for i in range(nc)]
    return model.train()


def synthetic_batches(n, batch, imgsz, nc=80, seed=0):
    """n (uint8 images, targets) pairs: targets rows are (image index, class, x, y, w, h), normalised, 3 per image."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        imgs = torch.randint(0, 256, (batch, 3, imgsz, imgsz), generator=g, dtype=torch.uint8)
        k = 3 * batch
        idx = torch.arange(batch).repeat_interleave(3)[:, None].float()
        cls = torch.randint(0, nc, (k, 1), generator=g).float()
        wh = torch.rand(k, 2, generator=g) * 0.4 + 0.05
        xy = wh / 2 + torch.rand(k, 2, generator=g) * (1 - wh)
        out.append((imgs, torch.cat([idx, cls, xy, wh], 1)))
    return out


class Loop:
    """One side's training loop: its model copy, ComputeLoss, smart_optimizer and ModelEMA from `tu`."""

    def __init__(self, tu, base, compute_loss_cls, device, amp_dtype=None):
        self.tu, self.device, self.amp_dtype = tu, torch.device(device), amp_dtype
        self.model = deepcopy(base)
        self.compute_loss = compute_loss_cls(self.model)
        hyp = self.model.hyp
        with contextlib.redirect_stdout(None):
            self.optimizer = tu.smart_optimizer(self.model, 'SGD', hyp['lr0'], hyp['momentum'], hyp['weight_decay'])
        self.ema = tu.ModelEMA(self.model)
        self.losses = []

    def train_part(self, imgs, targets):
        """Everything of the step but the EMA update, as train.py runs it."""
        imgs = imgs.to(self.device, non_blocking=True).float() / 255
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.bfloat16, enabled=bool(self.amp_dtype)):
            pred = self.model(imgs)
            loss, loss_items = self.compute_loss(pred, targets.to(self.device))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm=10.0)
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.losses.append(loss_items.detach())

    def step(self, imgs, targets):
        """One step, each part timed to a device sync: (train part ms, EMA update ms)."""
        t0 = time.perf_counter()
        self.train_part(imgs, targets)
        harness.sync(self.device)
        t1 = time.perf_counter()
        self.ema.update(self.model)
        harness.sync(self.device)
        return (t1 - t0) * 1e3, (time.perf_counter() - t1) * 1e3


@contextlib.contextmanager
def bound(yolo, tu):
    """yolov5.models.yolo with `tu`'s fuse_conv_and_bn and model_info bound, as the module swap (sys.modules before
    the first YOLOv5 import) binds them: Model.fuse() then runs that side's functions."""
    saved = yolo.fuse_conv_and_bn, yolo.model_info
    yolo.fuse_conv_and_bn, yolo.model_info = tu.fuse_conv_and_bn, tu.model_info
    try:
        yield
    finally:
        yolo.fuse_conv_and_bn, yolo.model_info = saved


def epoch_calls(loop, yolo, imgsz):
    """{name: (untimed setup, timed call)}: the torch_utils calls outside the step. train.py v7.0 makes
    update_attr once per epoch, model_info when it builds the model and Model.fuse() (which logs model_info again)
    once per run, for the final validation of best.pt; sparsity only a pruning user calls."""
    tu, ema, held = loop.tu, loop.ema, {}

    def copy_ema():
        held['m'] = deepcopy(ema.ema)

    def fuse():
        with bound(yolo, tu), contextlib.redirect_stdout(None):
            held['fused'] = held['m'].fuse()
    return held, {
        'update_attr': (None, lambda: ema.update_attr(loop.model, include=UPDATE_ATTR)),
        'model_info': (None, lambda: tu.model_info(loop.model, False, imgsz)),
        'fuse': (copy_ema, fuse),
        'sparsity': (None, lambda: float(tu.sparsity(ema.ema))),
    }
