"""Training helpers: the seed's (initialize_weights, find_modules, scale_img, copy_attr, smart_optimizer,
smart_resume, EarlyStopping) and the ones YOLOv5 v7.0/master import from this module."""
import functools
import math
from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._log import LOGGER, check_version, colorstr

_TORCH = torch.__version__.split('+')[0]


def smart_inference_mode(torch_1_9=check_version(_TORCH, '1.9.0'), *, mode=True):
    """Decorator factory: ``@smart_inference_mode()`` runs fn under inference_mode (torch>=1.9) else no_grad.

    ``mode=False`` (Ultralytics' keyword) runs fn with inference mode switched off and gradients off, so tensors
    it makes can later be used in autograd. Ultralytics' first positional argument is ``mode``: the seed's
    ``torch_1_9`` keeps that position here.
    """
    def decorate(fn):
        if not mode:
            @functools.wraps(fn)
            def outside_inference_mode(*args, **kwargs):
                with torch.inference_mode(False), torch.no_grad():
                    return fn(*args, **kwargs)
            return outside_inference_mode
        return (torch.inference_mode if torch_1_9 else torch.no_grad)()(fn)
    return decorate


def smart_amp_autocast(amp=False, *, enabled=None, device='cuda'):
    """Autocast context for ``device`` (default CUDA) enabled by ``amp``; CUDA autocast is disabled silently
    when CUDA is not available.

    Also YOLOv5 master's form, which is Ultralytics' ``autocast(enabled, device='cuda')``: ``enabled=`` is an
    alias of ``amp`` and, like ``amp``, may be a ``torch.dtype`` (e.g. ``torch.bfloat16``) to autocast to.
    """
    if enabled is not None:
        amp = enabled
    dtype = amp if isinstance(amp, torch.dtype) else None
    on = bool(amp)
    device = torch.device(device).type if not isinstance(device, str) else device.split(':')[0]
    if device == 'cuda':
        on = on and torch.cuda.is_available()  # asking for it on a CPU-only torch only warns
    if not check_version(_TORCH, '1.10.0'):
        return torch.cuda.amp.autocast(on) if on and device == 'cuda' else nullcontext()
    kwargs = {'dtype': dtype} if dtype is not None else {}
    return torch.amp.autocast(device, enabled=on, **kwargs)


def smartCrossEntropyLoss(label_smoothing=0.0):
    """nn.CrossEntropyLoss with label smoothing when torch supports it (>=1.10)."""
    if check_version(_TORCH, '1.10.0'):
        return nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    if label_smoothing > 0:
        LOGGER.warning(f'WARNING ⚠️ label smoothing {label_smoothing} requires torch>=1.10.0')
    return nn.CrossEntropyLoss()


def reshape_classifier_output(model, n=1000):
    """Make a classifier's last layer output ``n`` classes (in place, only when it differs).

    Handles a YOLOv5 Classify head (any module with a ``.linear`` nn.Linear), a final nn.Linear
    (ResNet, EfficientNet), or an nn.Sequential whose last Linear / else last Conv2d is the output.
    """
    name, m = list((model.model if hasattr(model, 'model') else model).named_children())[-1]  # last module
    if isinstance(getattr(m, 'linear', None), nn.Linear):  # YOLOv5 Classify(), duck-typed: no models/ needed
        if m.linear.out_features != n:
            m.linear = nn.Linear(m.linear.in_features, n)
    elif isinstance(m, nn.Linear):
        if m.out_features != n:
            setattr(model.model if hasattr(model, 'model') else model, name, nn.Linear(m.in_features, n))
    elif isinstance(m, nn.Sequential):
        types = [type(x) for x in m]
        if nn.Linear in types:
            i = len(types) - 1 - types[::-1].index(nn.Linear)  # the last one is the output
            if m[i].out_features != n:
                m[i] = nn.Linear(m[i].in_features, n)
        elif nn.Conv2d in types:
            i = len(types) - 1 - types[::-1].index(nn.Conv2d)
            if m[i].out_channels != n:
                m[i] = nn.Conv2d(m[i].in_channels, n, m[i].kernel_size, m[i].stride, bias=m[i].bias is not None)


def smart_hub_load(repo='ultralytics/yolov5', model='yolov5s', **kwargs):
    """torch.hub.load() that skips GitHub validation (rate limits), trusts the repo, and retries with
    force_reload=True once."""
    if check_version(_TORCH, '1.9.1'):
        kwargs['skip_validation'] = True
    if check_version(_TORCH, '1.12.0'):
        kwargs['trust_repo'] = True
    try:
        return torch.hub.load(repo, model, **kwargs)
    except Exception:
        return torch.hub.load(repo, model, force_reload=True, **kwargs)


_IN_PLACE = frozenset((nn.Hardswish, nn.LeakyReLU, nn.ReLU, nn.ReLU6, nn.SiLU))


def initialize_weights(model):
    """YOLOv5's defaults: every BatchNorm2d gets eps=1e-3 and momentum=0.03, the Hardswish, LeakyReLU, ReLU, ReLU6
    and SiLU activations run in place, convolutions keep torch's initialisation. Exact types, as the seed matches
    them (a subclass is left as it is)."""
    for m in model.modules():
        if type(m) is nn.BatchNorm2d:
            m.eps, m.momentum = 1e-3, 0.03
        elif type(m) in _IN_PLACE:
            m.inplace = True


def find_modules(model, mclass=nn.Conv2d):
    """Indices of ``model.module_list`` entries that are ``mclass``."""
    return [i for i, m in enumerate(model.module_list) if isinstance(m, mclass)]


def scale_img(img, ratio=1.0, same_shape=False, gs=32):  # img(16,3,256,416)
    """Resize img(bs,3,y,x) by ratio; unless same_shape, pad to a gs multiple with 0.447 (ImageNet mean)."""
    if ratio == 1.0:
        return img
    h, w = img.shape[2:]
    s = (int(h * ratio), int(w * ratio))
    img = F.interpolate(img, size=s, mode='bilinear', align_corners=False)
    if not same_shape:
        h, w = (math.ceil(x * ratio / gs) * gs for x in (h, w))
    return F.pad(img, [0, w - s[1], 0, h - s[0]], value=0.447)


def copy_attr(a, b, include=(), exclude=()):
    """Copy b's public attributes to a, only those in ``include`` (if given) and none in ``exclude``."""
    for k, v in b.__dict__.items():
        if (len(include) and k not in include) or k.startswith('_') or k in exclude:
            continue
        setattr(a, k, v)


def smart_optimizer(model, name='Adam', lr=0.001, momentum=0.9, decay=1e-5):
    """YOLOv5 3-group optimizer: group 0 biases (no decay), then weights with ``decay``, then norm weights
    (no decay)."""
    g = [], [], []  # 0) weights with decay, 1) norm weights, 2) biases
    bn = tuple(v for k, v in nn.__dict__.items() if 'Norm' in k and isinstance(v, type))  # e.g. BatchNorm2d
    for v in model.modules():
        if hasattr(v, 'bias') and isinstance(v.bias, nn.Parameter):
            g[2].append(v.bias)
        if isinstance(v, bn):
            if isinstance(v.weight, nn.Parameter):  # affine=False norms have weight None
                g[1].append(v.weight)
        elif hasattr(v, 'weight') and isinstance(v.weight, nn.Parameter):
            g[0].append(v.weight)

    if name == 'Adam':
        optimizer = torch.optim.Adam(g[2], lr=lr, betas=(momentum, 0.999))  # beta1 follows momentum
    elif name == 'AdamW':
        optimizer = torch.optim.AdamW(g[2], lr=lr, betas=(momentum, 0.999), weight_decay=0.0)
    elif name == 'RMSProp':
        optimizer = torch.optim.RMSprop(g[2], lr=lr, momentum=momentum)
    elif name == 'SGD':
        optimizer = torch.optim.SGD(g[2], lr=lr, momentum=momentum, nesterov=True)
    else:
        raise NotImplementedError(f'Optimizer {name} not implemented.')
    optimizer.add_param_group({'params': g[0], 'weight_decay': decay})
    optimizer.add_param_group({'params': g[1], 'weight_decay': 0.0})
    LOGGER.info(f"{colorstr('optimizer:')} {type(optimizer).__name__}(lr={lr}) with parameter groups "
                f'{len(g[1])} weight(decay=0.0), {len(g[0])} weight(decay={decay}), {len(g[2])} bias')
    return optimizer


def smart_resume(ckpt, optimizer, ema=None, weights='yolov5s.pt', epochs=300, resume=True):
    """Restore optimizer and EMA from a checkpoint; returns (best_fitness, start_epoch, epochs)."""
    best_fitness = 0.0
    start_epoch = ckpt['epoch'] + 1
    if ckpt.get('optimizer') is not None:
        optimizer.load_state_dict(ckpt['optimizer'])
        best_fitness = ckpt['best_fitness']
    if ema is not None and ckpt.get('ema') is not None:
        ema.ema.load_state_dict(ckpt['ema'].float().state_dict())
        ema.updates = ckpt['updates']
    if resume:
        if start_epoch <= 0:
            raise ValueError(f'{weights} training to {epochs} epochs is finished, nothing to resume.\n'
                             f"Start a new training without --resume, i.e. 'python train.py --weights {weights}'")
        LOGGER.info(f'Resuming training from {weights} from epoch {start_epoch} to {epochs} total epochs')
    if epochs < start_epoch:
        LOGGER.info(f"{weights} has been trained for {ckpt['epoch']} epochs. Fine-tuning for {epochs} more epochs.")
        epochs += ckpt['epoch']  # fine-tune additional epochs
    return best_fitness, start_epoch, epochs


class EarlyStopping:
    """Stop when fitness has not improved for ``patience`` epochs (patience 0/None disables)."""

    def __init__(self, patience=30):
        self.best_fitness = 0.0  # i.e. mAP
        self.best_epoch = 0
        self.patience = patience or float('inf')
        self.possible_stop = False  # a stop may occur next epoch

    def __call__(self, epoch, fitness):
        if fitness is None:  # no validation this epoch (Ultralytics' val=False): nothing to judge
            return False
        if fitness >= self.best_fitness:  # >= so an early zero-fitness stage still counts as progress
            self.best_epoch = epoch
            self.best_fitness = fitness
        delta = epoch - self.best_epoch  # epochs without improvement
        self.possible_stop = delta >= (self.patience - 1)
        stop = delta >= self.patience
        if stop:
            LOGGER.info(f'Stopping training early as no improvement observed in last {self.patience} epochs. '
                        f'Best results observed at epoch {self.best_epoch}, best model saved as best.pt.\n'
                        f'To update EarlyStopping(patience={self.patience}) pass a new patience value, '
                        f'i.e. `python train.py --patience 300` or use `--patience 0` to disable EarlyStopping.')
        return stop
