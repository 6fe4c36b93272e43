"""The seed's other functions (YOLOv5's utils/torch_utils.py), restated independently of the package with the
seed's behaviour (same results, side effects and printed text): the oracle the API tests run beside ours. The
seed's LOGGER/thop imports are left out (they need a YOLOv5 checkout); nothing these functions return or change
depends on them. ModelEMA's oracle is in seed_oracle.py."""
import logging
import time

import torch
import torch.nn as nn
import torch.nn.utils.prune as torch_prune

LOGGER = logging.getLogger('seed_api')
_WRAPPERS = (nn.parallel.DataParallel, nn.parallel.DistributedDataParallel)
_INPLACE_ACTS = (nn.Hardswish, nn.LeakyReLU, nn.ReLU, nn.ReLU6, nn.SiLU)


def time_sync():
    """Wall-clock seconds, after waiting for CUDA work when CUDA is there."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.time()


def is_parallel(model):
    """Exactly DataParallel or DistributedDataParallel (subclasses are not)."""
    return type(model) in _WRAPPERS


def de_parallel(model):
    return model.module if is_parallel(model) else model


def initialize_weights(model):
    """BatchNorm2d (exact type): eps 1e-3, momentum 0.03; the listed activations (exact types) in place."""
    for m in model.modules():
        kind = type(m)
        if kind is nn.BatchNorm2d:
            m.eps, m.momentum = 1e-3, 0.03
        elif kind in _INPLACE_ACTS:
            m.inplace = True


def sparsity(model):
    """Zero parameters over all parameters, as a 0-d tensor (0 / 0 raises ZeroDivisionError, as the seed does)."""
    total, zeros = 0, 0
    for p in model.parameters():
        total += p.numel()
        zeros += (p == 0).sum()
    return zeros / total


def prune(model, amount=0.3):
    """L1-unstructured pruning of every Conv2d weight (isinstance), made permanent, with the seed's two prints."""
    print('Pruning model... ', end='')
    for _, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            torch_prune.l1_unstructured(m, name='weight', amount=amount)
            torch_prune.remove(m, 'weight')
    print(' %.3g global sparsity' % sparsity(model))


def model_info_counts(model):
    """(layers, parameters, trainable parameters): what the seed's model_info computes and logs (it returns None)."""
    params = list(model.parameters())
    return len(list(model.modules())), sum(p.numel() for p in params), \
        sum(p.numel() for p in params if p.requires_grad)


def copy_attr(a, b, include=(), exclude=()):
    """Sets on a each public attribute of b's __dict__ that include (when given) names and exclude does not."""
    for k, v in b.__dict__.items():
        skip = (len(include) and k not in include) or k.startswith('_') or k in exclude
        if not skip:
            setattr(a, k, v)


def update_attr(ema_module, model, include=(), exclude=('process_group', 'reducer')):
    """ModelEMA.update_attr, on the EMA module itself."""
    copy_attr(ema_module, model, include, exclude)


class EarlyStopping:
    """Stops once `patience` epochs have passed since the best fitness (ties count as new bests)."""

    def __init__(self, patience=30):
        self.best_fitness, self.best_epoch = 0.0, 0
        self.patience = patience or float('inf')
        self.possible_stop = False

    def __call__(self, epoch, fitness):
        if fitness >= self.best_fitness:
            self.best_epoch, self.best_fitness = epoch, fitness
        waited = epoch - self.best_epoch
        self.possible_stop = waited >= self.patience - 1
        stop = waited >= self.patience
        if stop:
            LOGGER.info(f'Stopping training early as no improvement observed in last {self.patience} epochs. ')
        return stop


def optimizer_groups(model):
    """smart_optimizer's three groups: weights with decay, normalisation weights, biases (each module's own)."""
    decayed, norm_weights, biases = [], [], []
    norms = tuple(v for k, v in nn.__dict__.items() if 'Norm' in k)
    for m in model.modules():
        if hasattr(m, 'bias') and isinstance(m.bias, nn.Parameter):
            biases.append(m.bias)
        if isinstance(m, norms):
            norm_weights.append(m.weight)
        elif hasattr(m, 'weight') and isinstance(m.weight, nn.Parameter):
            decayed.append(m.weight)
    return decayed, norm_weights, biases
