"""In-process YOLOv5 n/s/m/l/x-shaped detection nets (v6+ yaml layout), random init, no download.

Dependency-free (torch only) because the unit tests import it too. The module structure mirrors
ultralytics/yolov5 models/common.py + yolo.py closely enough that parameter counts, tensor counts
(yolov5s: 292 floating state_dict entries) and the Conv `.conv/.bn/.act/forward_fuse` shape match,
which is what EMA / fusion / sparsity cost depends on.
"""
import math

import torch
import torch.nn as nn

# (depth_multiple, width_multiple) from yolov5{n,s,m,l,x}.yaml
SIZES = {'n': (0.33, 0.25), 's': (0.33, 0.50), 'm': (0.67, 0.75), 'l': (1.0, 1.0), 'x': (1.33, 1.25)}
# Parameter counts of the real models (nc=80), for the builder's own check.
REAL_PARAMS = {'n': 1.87e6, 's': 7.24e6, 'm': 21.2e6, 'l': 46.6e6, 'x': 86.7e6}
ANCHORS = [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]]


def autopad(k, p=None, d=1):
    if d > 1:
        k = d * (k - 1) + 1
    return k // 2 if p is None else p


class Conv(nn.Module):
    """Conv2d(bias=False) + BatchNorm2d + SiLU, as YOLOv5's Conv (fusion target)."""

    def __init__(self, c1, c2, k=1, s=1, p=None, g=1, d=1, act=True):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, autopad(k, p, d), groups=g, dilation=d, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = nn.SiLU() if act is True else (act if isinstance(act, nn.Module) else nn.Identity())

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))

    def forward_fuse(self, x):
        return self.act(self.conv(x))


class Bottleneck(nn.Module):
    def __init__(self, c1, c2, shortcut=True, g=1, e=0.5):
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c_, c2, 3, 1, g=g)
        self.add = shortcut and c1 == c2

    def forward(self, x):
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C3(nn.Module):
    def __init__(self, c1, c2, n=1, shortcut=True, g=1, e=0.5):
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c1, c_, 1, 1)
        self.cv3 = Conv(2 * c_, c2, 1)
        self.m = nn.Sequential(*(Bottleneck(c_, c_, shortcut, g, e=1.0) for _ in range(n)))

    def forward(self, x):
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


class SPPF(nn.Module):
    def __init__(self, c1, c2, k=5):
        super().__init__()
        c_ = c1 // 2
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c_ * 4, c2, 1, 1)
        self.m = nn.MaxPool2d(kernel_size=k, stride=1, padding=k // 2)

    def forward(self, x):
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        return self.cv2(torch.cat((x, y1, y2, self.m(y2)), 1))


class Concat(nn.Module):
    def __init__(self, dimension=1):
        super().__init__()
        self.d = dimension

    def forward(self, x):
        return torch.cat(x, self.d)


class Detect(nn.Module):
    """Head: one 1x1 Conv2d (with bias) per level; `anchors` is a float buffer as in YOLOv5."""

    def __init__(self, nc=80, anchors=ANCHORS, ch=()):
        super().__init__()
        self.nc, self.no, self.nl = nc, nc + 5, len(anchors)
        self.na = len(anchors[0]) // 2
        self.register_buffer('anchors', torch.tensor(anchors).float().view(self.nl, -1, 2))
        self.m = nn.ModuleList(nn.Conv2d(x, self.no * self.na, 1) for x in ch)

    def forward(self, x):
        out = []
        for i, m in enumerate(self.m):
            y = m(x[i])
            bs, _, ny, nx = y.shape
            out.append(y.view(bs, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).contiguous())
        return out


def _make_divisible(x, divisor=8):
    return math.ceil(x / divisor) * divisor


# yolov5 v6 yaml: (from, repeats, module, args); Upsample = nn.Upsample(None, 2, 'nearest').
_BACKBONE = [(-1, 1, 'Conv', [64, 6, 2, 2]), (-1, 1, 'Conv', [128, 3, 2]), (-1, 3, 'C3', [128]),
             (-1, 1, 'Conv', [256, 3, 2]), (-1, 6, 'C3', [256]), (-1, 1, 'Conv', [512, 3, 2]),
             (-1, 9, 'C3', [512]), (-1, 1, 'Conv', [1024, 3, 2]), (-1, 3, 'C3', [1024]),
             (-1, 1, 'SPPF', [1024, 5])]
_HEAD = [(-1, 1, 'Conv', [512, 1, 1]), (-1, 1, 'Upsample', []), ([-1, 6], 1, 'Concat', [1]),
         (-1, 3, 'C3', [512, False]), (-1, 1, 'Conv', [256, 1, 1]), (-1, 1, 'Upsample', []),
         ([-1, 4], 1, 'Concat', [1]), (-1, 3, 'C3', [256, False]), (-1, 1, 'Conv', [256, 3, 2]),
         ([-1, 14], 1, 'Concat', [1]), (-1, 3, 'C3', [512, False]), (-1, 1, 'Conv', [512, 3, 2]),
         ([-1, 10], 1, 'Concat', [1]), (-1, 3, 'C3', [1024, False]), ([17, 20, 23], 1, 'Detect', [])]


class YOLOv5(nn.Module):
    """Sequential-with-skips graph like yolov5's DetectionModel (`self.model` + per-layer `.f`)."""

    def __init__(self, size='s', nc=80):
        super().__init__()
        gd, gw = SIZES[size]
        ch, layers, save = [3], [], set()
        for i, (f, n, name, args) in enumerate(_BACKBONE + _HEAD):
            n = max(round(n * gd), 1) if n > 1 else n
            if name in ('Conv', 'C3', 'SPPF'):
                c1, c2 = ch[f], _make_divisible(args[0] * gw, 8)
                if name == 'C3':
                    m = C3(c1, c2, n, *args[1:])
                else:
                    m = {'Conv': Conv, 'SPPF': SPPF}[name](c1, c2, *args[1:])
            elif name == 'Upsample':
                m, c2 = nn.Upsample(None, 2, 'nearest'), ch[f]
            elif name == 'Concat':
                m, c2 = Concat(*args), sum(ch[x] for x in f)
            else:  # Detect
                m, c2 = Detect(nc, ANCHORS, [ch[x] for x in f]), None
            m.f, m.i = f, i
            save.update(x % i for x in ([f] if isinstance(f, int) else f) if x != -1)
            layers.append(m)
            ch = ch[1:] if i == 0 else ch  # ch[0] was the input; afterwards ch[i] = output of layer i
            ch.append(c2)
        self.model = nn.Sequential(*layers)
        self.save = sorted(save)
        self.stride = torch.tensor([8., 16., 32.])

    def forward(self, x):
        y = []
        for m in self.model:
            if m.f != -1:
                x = y[m.f] if isinstance(m.f, int) else [x if j == -1 else y[j] for j in m.f]
            x = m(x)
            y.append(x if m.i in self.save else None)
        return x


@torch.no_grad()
def _randomize_bn(model, gen):
    # Non-trivial BN statistics so fusion actually changes weights (fresh BN is an identity fold).
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eps, m.momentum = 1e-3, 0.03  # yolov5 initialize_weights
            c = m.num_features
            m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
            m.bias.copy_(torch.randn(c, generator=gen) * 0.1)
            m.running_mean.copy_(torch.randn(c, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)


def build_yolov5(size: str, seed: int = 0) -> nn.Module:
    """YOLOv5{size}-shaped model (size in n/s/m/l/x), random init, eval mode, deterministic for `seed`."""
    if size not in SIZES:
        raise ValueError(f'size must be one of {sorted(SIZES)}, got {size!r}')
    torch.manual_seed(seed)
    model = YOLOv5(size)
    _randomize_bn(model, torch.Generator().manual_seed(seed))
    return model.eval()


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


if __name__ == '__main__':
    for s in SIZES:
        m = build_yolov5(s)
        nf = sum(v.dtype.is_floating_point for v in m.state_dict().values())
        print(s, n_params(m), f'{n_params(m) / REAL_PARAMS[s]:.3f}', nf, 'float tensors')
