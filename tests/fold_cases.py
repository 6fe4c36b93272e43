"""Single-layer fold cases shared by the property tests and the fixed-case tests: inputs, a float64 oracle, and
the check that runs one case on both backends."""
import torch
import torch.nn as nn
from conftest import same_layout_clone as _same_layout_clone
from conftest import ulps

import torchutils_ext as tx
from torchutils_ext import _ops

F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64

CONVS = {
    1: (nn.Conv1d, nn.ConvTranspose1d, nn.BatchNorm1d),
    2: (nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d),
    3: (nn.Conv3d, nn.ConvTranspose3d, nn.BatchNorm3d),
}


def _fold_inputs(case, device='cpu'):
    nd, transposed, groups, cin, cout, kernel, bias, affine, dtype, layout, seed = case
    torch.manual_seed(seed)
    if nd == 0:
        layer, bn = nn.Linear(cin, cout, bias=bias), nn.BatchNorm1d(cout, affine=affine)
    else:
        conv, convt, bn_cls = CONVS[nd]
        cls = convt if transposed else conv
        layer, bn = cls(cin, cout, kernel, groups=groups, bias=bias), bn_cls(cout, affine=affine)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.2, 2.0)
        if affine:
            bn.weight.normal_()
            bn.bias.normal_()
    w = layer.weight.detach().to(device=device, dtype=dtype)
    if layout == 'channels_last' and w.dim() == 4:
        w = w.contiguous(memory_format=torch.channels_last)
    elif layout == 'strided':
        w = _same_layout_clone_strided(w)
    vec = lambda t: None if t is None else t.detach().to(device=device, dtype=dtype)  # noqa: E731
    args = ([w], [vec(layer.bias)], [vec(bn.weight)], [vec(bn.bias)], [vec(bn.running_mean)],
            [vec(bn.running_var)], [bn.eps], [groups if transposed else 0])
    return args, transposed, groups


def _same_layout_clone_strided(w):
    """w's values in a non-dense view (every other element of the last dim of a wider buffer)."""
    wide = torch.zeros(*w.shape[:-1], 2 * w.shape[-1], dtype=w.dtype, device=w.device)
    view = wide[..., ::2]
    view.copy_(w)
    return view


def _f64_fold(args, transposed, groups):
    (w,), (b,), (bw,), (bb,), (mean,), (var,), (eps,), _ = args
    scale = (1.0 if bw is None else bw.double()) / torch.sqrt(var.double() + eps)
    scale = scale.expand(var.shape)
    shift = ((0.0 if b is None else b.double()) - mean.double()) * scale + (0.0 if bb is None else bb.double())
    if transposed:
        cin, opg = w.shape[0], w.shape[1]
        f = scale.view(groups, 1, opg).expand(groups, cin // groups, opg).reshape(cin, opg)
        f = f.view(cin, opg, *([1] * (w.dim() - 2)))
    else:
        f = scale.view(-1, *([1] * (w.dim() - 1)))
    return w.double() * f, shift


FOLD_RTOL = {F32: 1e-6, F64: 1e-14, F16: 2 ** -10, BF16: 2 ** -7}


def check_fold_case(case, inplace, device='cpu'):
    """The fold of one layer on both backends against float64; the backends agree bit for bit, except fp64
    (torch's double sqrt on the CPU is not correctly rounded): at most one ulp apart there."""
    args, transposed, groups = _fold_inputs(case, device)
    dtype = args[0][0].dtype
    ref_w, ref_b = _f64_fold(args, transposed, groups)
    results = {}
    for backend in ('torch', 'ext') if _ops._has_kernel('fold_conv_bn', torch.device(device).type) else ('torch',):
        w_in = [_same_layout_clone(args[0][0])]
        before = w_in[0].clone()
        with tx.use_backend(backend):
            (w,), (b,) = _ops.fold_conv_bn(w_in, *args[1:], inplace=inplace)
        if inplace:
            assert w is w_in[0]
        else:
            assert torch.equal(w_in[0], before), 'the functional fold must not write its input'
        assert w.dtype == dtype and b.dtype == dtype and b.shape == ref_b.shape
        torch.testing.assert_close(w.double(), ref_w, rtol=FOLD_RTOL[dtype], atol=FOLD_RTOL[dtype] * 1e-3)
        torch.testing.assert_close(b.double(), ref_b, rtol=FOLD_RTOL[dtype], atol=FOLD_RTOL[dtype])
        results[backend] = (w, b)
    if 'ext' not in results:
        return
    (ew, eb), (tw, tb) = results['ext'], results['torch']
    if dtype != F64:
        assert ulps(ew, tw) == 0 and ulps(eb, tb) == 0, 'compiled and pure-torch folds must agree bit for bit'
        return
    # fp64: the kernels' std::sqrt is correctly rounded, torch's double sqrt is not, so a scale may be one ulp
    # apart; weights and each bias term then stay within 2^-50 of their own magnitude (README)
    (_, _, _, (bb,), _, _, _, _) = args
    terms = (ref_b - (0.0 if bb is None else bb.double())).abs() + (0.0 if bb is None else bb.double().abs())
    assert ((ew - tw).abs() <= 2.0 ** -50 * tw.abs()).all()
    assert ((eb - tb).abs() <= 2.0 ** -50 * terms).all()
