"""The implementations we compare against, written out here so the comparison is reproducible.

- Seed: faithful copies of YOLOv5's utils/torch_utils.py `ModelEMA`, `fuse_conv_and_bn`, `sparsity`.
- Pure-torch peers: what a careful user would write today (timm-style foreach EMA, cached-list foreach EMA,
  torch's `fuse_conv_bn_eval`, an in-place broadcast fold, summed `count_nonzero`).
- Real third-party classes (timm `ModelEmaV3`, Ultralytics `ModelEMA`) when importable.

Every EMA class here takes (model, decay, tau, updates) and uses the seed's decay ramp, so all of them
walk the same decay sequence and their states can be checked against one float64 reference.
"""

import torch
import torch.nn as nn


# The seed's ModelEMA and decay ramp are the tests' oracle (tests/seed_oracle.py): one text for both.
from seed_oracle import SeedModelEMA, seed_decay  # noqa: E402,F401
from seed_api import sparsity as seed_sparsity  # noqa: E402,F401  (the seed's other functions, tests/seed_api.py)


class TimmStyleEMA(SeedModelEMA):
    """timm ModelEmaV3._apply_update: float lists rebuilt from state_dict() each call, one _foreach_lerp_;
    non-float buffers copied (timm's policy). Fails on mixed dtypes, as timm does."""

    def update(self, model):
        with torch.no_grad():
            self.updates += 1
            d = self.decay(self.updates)
            ema_l, model_l = [], []
            for ema_v, model_v in zip(self.ema.state_dict().values(), model.state_dict().values()):
                if ema_v.is_floating_point():
                    ema_l.append(ema_v)
                    model_l.append(model_v)
                else:
                    ema_v.copy_(model_v)
            torch._foreach_lerp_(ema_l, model_l, weight=1. - d)


class _CachedLists(SeedModelEMA):
    """Float state lists built once, on the first update (after any dtype change of the model)."""
    _lists = None

    def _get_lists(self, model):
        if self._lists is None:
            msd = model.state_dict()
            pairs = [(v, msd[k]) for k, v in self.ema.state_dict().items() if v.dtype.is_floating_point]
            self._lists = [p[0] for p in pairs], [p[1] for p in pairs]
        return self._lists


class CachedForeachLerpEMA(_CachedLists):
    """`_foreach_lerp_` over lists cached once: the fastest plain-torch EMA for same-dtype models."""

    def update(self, model):
        with torch.no_grad():
            self.updates += 1
            d = self.decay(self.updates)
            ema_l, model_l = self._get_lists(model)
            torch._foreach_lerp_(ema_l, model_l, weight=1. - d)


class CachedForeachAxpbyEMA(_CachedLists):
    """`_foreach_mul_` + `_foreach_add_(alpha=1-d)` over cached lists: the seed's formula in foreach form;
    unlike `_foreach_lerp_` it accepts an fp32 EMA with a bf16/fp16 model (slow path)."""

    def update(self, model):
        with torch.no_grad():
            self.updates += 1
            d = self.decay(self.updates)
            ema_l, model_l = self._get_lists(model)
            torch._foreach_mul_(ema_l, d)
            torch._foreach_add_(ema_l, model_l, alpha=1. - d)


class CachedForeachSeedFormulaEMA(_CachedLists):
    """The seed's formula with no fused multiply-add, over cached lists: `tmp = (1 - d) * m` rounded on its own,
    `e *= d`, `e += tmp` (a half/bf16 model upcast to the EMA's dtype first). The pure-torch peer with the
    numerics of our default mode; `_foreach_add_(alpha=)` (the mul+add row) fuses a multiply-add and
    differs from the seed in the last bit of ~0.2% of the elements."""

    def update(self, model):
        with torch.no_grad():
            self.updates += 1
            d = self.decay(self.updates)
            ema_l, model_l = self._get_lists(model)
            ms = [m if m.dtype == e.dtype else m.to(e.dtype) for e, m in zip(ema_l, model_l)]
            tmp = torch._foreach_mul(ms, 1. - d)
            torch._foreach_mul_(ema_l, d)
            torch._foreach_add_(ema_l, tmp)


class CachedForeachUpcastLerpEMA(_CachedLists):
    """Mixed dtypes: upcast the model list to the EMA dtype each call, then `_foreach_lerp_`."""

    def update(self, model):
        with torch.no_grad():
            self.updates += 1
            d = self.decay(self.updates)
            ema_l, model_l = self._get_lists(model)
            torch._foreach_lerp_(ema_l, [m.to(e.dtype) for e, m in zip(ema_l, model_l)], weight=1. - d)


class TimmModelEmaV3:
    """timm's own ModelEmaV3, driven with the seed's decay sequence (its warm-up schedule differs)."""

    def __init__(self, model, decay=0.9999, tau=2000, updates=0):
        from timm.utils.model_ema import ModelEmaV3
        self.impl = ModelEmaV3(model, decay=decay, use_warmup=False)
        self.ema, self.updates, self._d = self.impl.module, updates, (decay, tau)

    def update(self, model):
        self.updates += 1
        self.impl.decay = seed_decay(self.updates, *self._d)
        self.impl.update(model)


class UltralyticsModelEMA:
    """Ultralytics' own ModelEMA (same formula and ramp as the seed)."""

    def __init__(self, model, decay=0.9999, tau=2000, updates=0):
        from ultralytics.utils.torch_utils import ModelEMA
        self.impl = ModelEMA(model, decay=decay, tau=tau, updates=updates)
        self.ema = self.impl.ema

    @property
    def updates(self):
        return self.impl.updates

    def update(self, model):
        self.impl.update(model)


def third_party_emas():
    """[(name, class or None, reason)] for the real library classes."""
    out = []
    for name, mod, cls in (('timm ModelEmaV3', 'timm', TimmModelEmaV3),
                           ('ultralytics ModelEMA', 'ultralytics', UltralyticsModelEMA)):
        try:
            __import__(mod)
            out.append((name, cls, ''))
        except Exception as e:  # not installed here (they need torchvision, i.e. the CUDA torch venv)
            out.append((name, None, f'{mod} not importable: {type(e).__name__}'))
    return out


# ------------------------------------------------------------------------------------------ fusion
def seed_fuse_conv_and_bn(conv, bn):
    """The seed's fuse: O(C^2) diag + mm; drops dilation / padding_mode / dtype (kept as is)."""
    fusedconv = nn.Conv2d(conv.in_channels, conv.out_channels, kernel_size=conv.kernel_size, stride=conv.stride,
                          padding=conv.padding, groups=conv.groups,
                          bias=True).requires_grad_(False).to(conv.weight.device)
    w_conv = conv.weight.clone().view(conv.out_channels, -1)
    w_bn = torch.diag(bn.weight.div(torch.sqrt(bn.eps + bn.running_var)))
    fusedconv.weight.copy_(torch.mm(w_bn, w_conv).view(fusedconv.weight.shape))
    b_conv = torch.zeros(conv.weight.size(0), device=conv.weight.device) if conv.bias is None else conv.bias
    b_bn = bn.bias - bn.weight.mul(bn.running_mean).div(torch.sqrt(bn.running_var + bn.eps))
    fusedconv.bias.copy_(torch.mm(w_bn, b_conv.reshape(-1, 1)).reshape(-1) + b_bn)
    return fusedconv


def torch_fuse_conv_bn_eval(conv, bn):
    from torch.nn.utils.fusion import fuse_conv_bn_eval
    return fuse_conv_bn_eval(conv, bn)


@torch.no_grad()
def inplace_broadcast_fold(conv, bn):
    """Pure-torch in-place fold: scale the existing weight by a broadcast per-channel factor (no copy)."""
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    conv.weight.mul_(scale.view(-1, *([1] * (conv.weight.dim() - 1))).to(conv.weight.dtype))
    b = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    conv.bias = nn.Parameter(((b - bn.running_mean) * scale + bn.bias).to(conv.weight.dtype), requires_grad=False)
    return conv


def conv_blocks(model):
    """YOLOv5-style Conv blocks (a `.conv` + `.bn` + `forward_fuse`) still holding their BN."""
    return [m for m in model.modules() if hasattr(m, 'conv') and hasattr(m, 'bn') and hasattr(m, 'forward_fuse')]


def fuse_model_per_layer(model, fuse_fn):
    """YOLOv5 Model.fuse(): per block `m.conv = fuse(m.conv, m.bn); del m.bn; m.forward = m.forward_fuse`."""
    for m in conv_blocks(model):
        m.conv = fuse_fn(m.conv, m.bn)
        delattr(m, 'bn')
        m.forward = m.forward_fuse
    return model


# -------------------------------------------------------------------------------------------- sparsity
def count_nonzero_sparsity(model):
    """Peer: one count_nonzero per parameter, summed on device, one division."""
    ps = list(model.parameters())
    total = sum(p.numel() for p in ps)
    nz = torch.stack([torch.count_nonzero(p) for p in ps]).sum()
    return (total - nz) / total
