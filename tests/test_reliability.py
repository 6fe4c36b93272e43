"""Inputs the seed accepts that a drop-in must accept too, on both backends (issue: reliability, round 2)."""
import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import assert_untouched, same_layout_clone, snapshot
from seed_oracle import SeedEMA

import torchutils_ext as tx
from torchutils_ext import _ops
from torchutils_ext._validate import SEED_ROUNDING_PAIRS


def _net(device='cpu'):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.Conv2d(6, 4, 1)).to(device)


def _train_and_update(model, *emas):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    for e in emas:
        e.update(model)


def _assert_same_state(a, b):
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert x.dtype == y.dtype and torch.equal(x, y), k


@pytest.mark.parametrize('decay', [np.float32(0.999), np.float64(0.999)])
def test_numpy_decay(backend, device, decay):
    model = _net(device)
    ours, seed = tx.ModelEMA(model, decay=decay, tau=2), SeedEMA(model, decay=float(decay), tau=2)
    for _ in range(3):
        _train_and_update(model, ours, seed)
    _assert_same_state(ours.ema, seed.ema)  # the decay read as the float it holds
    e, m = [torch.ones(3, device=device)], [torch.zeros(3, device=device)]
    _ops.ema_update_(e, m, np.float32(0.5))  # the op wrapper takes a numpy scalar too
    assert torch.equal(e[0], torch.full((3,), 0.5, device=device))


@pytest.mark.parametrize('bad', [True, 'x', None])
def test_non_number_decay_is_a_type_error(bad):
    with pytest.raises(TypeError, match='decay'):
        tx.ModelEMA(_net(), decay=bad)


def test_prune_takes_a_count_like_torch(backend, capsys):
    model = _net()
    tx.prune(model, 5)  # torch's pruning: an int is a number of weights per layer
    zeros = [int((m.weight == 0).sum()) for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert zeros == [5, 5]
    with pytest.raises(ValueError, match='count'):
        tx.prune(model, -1)
    with pytest.raises(ValueError, match='fraction'):
        tx.prune(model, 1.5)
    with pytest.raises(TypeError):
        tx.prune(model, True)


def test_meta_decay_tensor_with_real_lists_raises(backend, device):
    e, m = [torch.ones(4, device=device)], [torch.zeros(4, device=device)]
    before = snapshot(e)
    with pytest.raises(ValueError, match='decay tensor is on meta'):
        _ops.ema_update_(e, m, torch.tensor(0.5, device='meta'))
    assert_untouched(before, e)


def test_sparsity_without_parameters_is_nan():
    """The seed divides 0 by 0 in Python (ZeroDivisionError); ours keeps its 0-d tensor type: nan (README)."""
    s = tx.sparsity(nn.ReLU())
    assert isinstance(s, torch.Tensor) and s.dim() == 0 and torch.isnan(s)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.SiLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


def _fuse(model):
    tx.fuse_model(model.eval())


def _delattr(model):
    del model[0].bn


def _del_item(model):
    del model[1]


def _replace_block(model):
    model[0] = nn.Conv2d(3, 4, 3)


@pytest.mark.parametrize('change', [_fuse, _delattr, _del_item, _replace_block])
def test_update_after_a_structure_change_raises_naming_the_entries(backend, device, change):
    torch.manual_seed(0)
    model = nn.Sequential(_Block(), nn.BatchNorm2d(4)).to(device)
    ema = tx.ModelEMA(model)
    ema.update(model)
    change(model)
    before = snapshot(list(ema.ema.state_dict().values()))
    named = r"no entry for the EMA's (0\.bn\.weight|1\.weight|0\.conv\.weight)"
    with pytest.raises(tx.ModelStructureError, match=named) as info:
        ema.update(model)
    assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)  # as the seed, and clearer
    assert "KeyError" not in str(info.value) and str(info.value).startswith('ModelEMA.update')
    assert_untouched(before, list(ema.ema.state_dict().values()))
    assert ema.updates == 1


def test_stateless_module_changes_do_not_rebuild(backend, device):
    torch.manual_seed(0)
    model = nn.Sequential(_Block(), nn.BatchNorm2d(4)).to(device)
    ema = tx.ModelEMA(model)
    ema.update(model)
    plan = ema._plan
    model[0].act = nn.ReLU()  # no state below it: the EMA's entries are all still there
    ema.update(model)
    assert ema._plan is plan and ema.updates == 2


@pytest.mark.parametrize('op', ['ema', 'fold'])
def test_self_overlapping_output_raises_before_any_write(backend, device, op):
    if op == 'ema':
        e = [torch.ones(3, device=device), torch.ones(1, device=device).expand(4)]  # 4 elements, one location
        before = snapshot(e)
        with pytest.raises(ValueError, match='share memory'):
            _ops.ema_update_(e, [torch.zeros(3, device=device), torch.zeros(4, device=device)], 0.5)
        assert_untouched(before, e)
    else:
        w = [torch.full((2, 2, 1, 1), 2.0, device=device), torch.ones(1, 1, 1, 1, device=device).expand(2, 1, 1, 1)]
        before = snapshot(w)
        with pytest.raises(ValueError, match='share memory'):
            _ops.fold_conv_bn(w, [None, None], [None, None], [None, None], [torch.zeros(2, device=device)] * 2,
                              [torch.ones(2, device=device)] * 2, [1e-5, 1e-5], [0, 0], inplace=True)
        assert_untouched(before, w)


WIDE_DTYPES = [getattr(torch, n) for n in ('uint16', 'uint32', 'uint64', 'float8_e4m3fn', 'float8_e5m2',
                                           'float8_e4m3fnuz', 'float8_e5m2fnuz') if hasattr(torch, n)]


@pytest.mark.parametrize('dtype', WIDE_DTYPES, ids=str)
def test_count_zeros_dtypes_the_seed_counts(backend, device, dtype):
    """The seed's `(p == 0).sum()` counts these; count_nonzero and logical_not have no CPU kernel for them."""
    src = torch.tensor([0, 1, 0, 2, 3, 0, 0, 1] * 40, dtype=torch.float32)
    t = src.to(dtype)
    if dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        t[1] = -0.0  # these formats have a negative zero: it is zero
    t = t.to(device)
    try:
        want = int((t == 0).sum())
    except (NotImplementedError, RuntimeError) as err:  # torch has no == for it there: the seed cannot count either
        pytest.skip(f'torch cannot compare {dtype} on {device}: {err}')
    assert want == 4 * 40 + (1 if dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else 0)
    assert int(_ops.count_zeros([t, torch.zeros(3, device=device)])) == want + 3
    assert int(_ops.count_zeros([t[::2]])) == int((t[::2] == 0).sum())  # strided: the fallback path


class _Conv2dSame(nn.Conv2d):
    """timm's Conv2dSame signature: no padding_mode, no device; 'same' padding computed in forward."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1, bias=True):
        super().__init__(in_channels, out_channels, kernel_size, stride, 0, dilation, groups, bias)

    def forward(self, x):
        k = self.weight.shape[-1]
        return nn.functional.conv2d(nn.functional.pad(x, [k // 2] * 4), self.weight, self.bias, self.stride)


class _NeedsExtra(nn.Conv2d):
    def __init__(self, tag, *args, **kw):
        super().__init__(*args, **kw)
        self.tag = tag


@pytest.mark.parametrize('make', [lambda: _Conv2dSame(3, 4, 3), lambda: _NeedsExtra('x', 3, 4, 3, padding=1)])
def test_fuse_conv_subclasses_that_init_cannot_rebuild(backend, make):
    torch.manual_seed(0)
    conv, bn = make().eval(), nn.BatchNorm2d(4).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    x = torch.randn(1, 3, 8, 8)
    fused = tx.fuse_conv_and_bn(conv, bn)
    assert type(fused) is type(conv) and getattr(fused, 'tag', None) == getattr(conv, 'tag', None)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), bn(conv(x)), rtol=1e-5, atol=1e-5)


def test_fuse_model_of_a_script_module_says_what_to_do():
    m = torch.jit.script(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval())
    with pytest.raises(TypeError, match='fuse the eager model first'):
        tx.fuse_model(m)


def test_fuse_model_leaves_a_conv_shared_by_two_blocks(backend):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3)
    a, b = _Block(), _Block()
    a.conv = b.conv = conv
    for blk in (a, b):
        with torch.no_grad():
            blk.bn.running_mean.uniform_(-1, 1)
    model = nn.Sequential(a, b.conv, b.bn).eval()
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        want = model[0](x), model[2](model[1](x))
        tx.fuse_model(model)
        got = model[0](x), model[2](model[1](x))
    assert hasattr(a, 'bn') and isinstance(model[2], nn.BatchNorm2d)  # neither pair folded
    for w, g in zip(want, got):
        assert torch.equal(w, g)


# fuse_model folds only pairs whose wiring is known; each of these wires .conv/.bn or a Sequential otherwise, and
# folding them anyway changed the output by 1.2 to 10.8 (max abs) before.
class _PreAct(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.SiLU()

    def forward(self, x):
        return self.conv(self.act(self.bn(x)))


class _SumBlock(nn.Module):  # Ultralytics' Conv2 shape: bn(conv(x) + cv2(x))
    def __init__(self):
        super().__init__()
        self.conv, self.cv2, self.bn, self.act = (nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1),
                                                  nn.BatchNorm2d(4), nn.SiLU())

    def forward(self, x):
        return self.act(self.bn(self.conv(x) + self.cv2(x)))


class _Reversed(nn.Sequential):
    def forward(self, x):
        for m in reversed(self):
            x = m(x)
        return x


class _StdConv(nn.Conv2d):  # weight standardisation: its forward transforms the weight
    def forward(self, x):
        w = (self.weight - self.weight.mean((1, 2, 3), keepdim=True)) / (self.weight.std((1, 2, 3), keepdim=True)
                                                                          + 1e-5)
        return nn.functional.conv2d(x, w, self.bias, self.stride, self.padding)


def _shared_elsewhere():
    blk = _Block()
    blk.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
    return nn.Sequential(blk, nn.Sequential(blk.conv))  # the conv also runs without its BN


def _hooked_conv():
    s = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))
    s[0].register_forward_hook(lambda m, i, o: o * 2 + 1)
    return s


@pytest.mark.parametrize('make', [_PreAct, _SumBlock, lambda: _Reversed(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)),
                                  lambda: nn.Sequential(_StdConv(4, 4, 3, padding=1), nn.BatchNorm2d(4)),
                                  _shared_elsewhere, _hooked_conv],
                         ids=['pre-activation', 'bn-of-a-sum', 'reordering-sequential', 'conv-with-own-forward',
                              'conv-used-twice', 'forward-hook'])
def test_fuse_model_leaves_pairs_whose_wiring_it_cannot_know(backend, make, caplog):
    torch.manual_seed(0)
    model = make().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 2)
    x = torch.randn(1, 4, 6, 6)
    with torch.no_grad():
        want = model(x)
        n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
        with caplog.at_level('DEBUG', logger='torchutils_ext'):
            tx.fuse_model(model)
        assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == n_bn
        assert torch.equal(model(x), want)
    assert 'left unfused' in caplog.text


@pytest.mark.parametrize('op', ['ema', 'fold'])
def test_interleaved_views_are_not_overlapping(backend, device, op):
    """Two columns of one buffer: their byte spans intersect, their elements do not. Accepted, and written right;
    a real overlap among strided views is still refused."""
    base = torch.zeros(6, 2, device=device)
    a, b = base[:, 0], base[:, 1]
    full = lambda n, v: torch.full((n,), v, device=device)  # noqa: E731
    if op == 'ema':
        _ops.ema_update_([a, b], [full(6, 1.0), full(6, 3.0)], 0.5)
        assert torch.equal(base, torch.tensor([[0.5, 1.5]] * 6, device=device))
        with pytest.raises(ValueError, match='overlap'):
            _ops.ema_update_([base[:, 0], base[::2, 0]], [full(6, 1.0), full(3, 1.0)], 0.5)
        with pytest.raises(ValueError, match='shares memory'):
            _ops.ema_update_([a], [base[:, 0]], 0.5)  # the model tensor is the EMA tensor
    else:
        w = torch.ones(4, 2, 1, 1, device=device)  # two weights that are interleaved halves of one buffer
        w0, w1 = w[:, 0:1], w[:, 1:2]
        _ops.fold_conv_bn([w0, w1], [None, None], [None, None], [None, None], [full(4, 0.0)] * 2,
                          [full(4, 4.0), full(4, 0.25)], [0.0, 0.0], [0, 0], inplace=True)
        assert torch.equal(w[:, 0], torch.full((4, 1, 1), 0.5, device=device))
        assert torch.equal(w[:, 1], torch.full((4, 1, 1), 2.0, device=device))


FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
ALL_PAIRS = [(e, m) for e in FLOATS for m in FLOATS]
_name = lambda d: str(d).replace('torch.', '')  # noqa: E731


def _pair_inputs(edt, mdt, seed=5, device='cpu'):
    """Odd sizes (the CPU loop's odd half, the CUDA vector tail, a chunk boundary), views one and two elements
    into a buffer (the CUDA kernel's scalar head; the last pair misaligned differently, all scalar), a dense
    permuted pair, and strided pairs (every other element, and layouts that differ)."""
    g = torch.Generator().manual_seed(seed)

    def make(dt, start):
        rnd = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dt)  # noqa: E731
        return [rnd(1), rnd(7, 5), rnd(301), rnd((1 << 16) * 2 + 3), rnd(6, 5).t(), rnd(40)[start::2],
                rnd(2, 3, 4, 5).contiguous(memory_format=torch.channels_last) if start else rnd(2, 3, 4, 5),
                rnd(8200)[1:], rnd(8200)[2:], rnd(8200)[1 + start:8198 + start]]
    return make(edt, 0), make(mdt, 1)


def _seed_formula(es, ms, d):
    out = [same_layout_clone(x) for x in es]
    for v, w in zip(out, ms):
        v *= d
        v += (1 - d) * w
    return out


@pytest.mark.parametrize('edt,mdt', ALL_PAIRS, ids=_name)
@pytest.mark.parametrize('decay', ['float', 'float64 tensor'])
def test_every_float_pair_the_seed_takes(device, monkeypatch, edt, mdt, decay):
    """A half/bf16/fp64 EMA of an fp32 model (the seed's own commented-out `self.ema.half()`), an fp32 EMA of an
    fp64 model, ...: every float pair runs on the compiled op; the seed-rounding pairs give the seed's bits, the
    other six the pure-torch twin's (the README's documented exceptions)."""
    if not (_ops.COMPILED and _ops._has_kernel('ema_update_', device.type)):
        pytest.skip('compiled ops not built')
    es, ms = _pair_inputs(edt, mdt, device=device)
    d = 0.9993 if decay == 'float' else torch.tensor(0.9993, dtype=torch.float64, device=device)
    twin = [same_layout_clone(x) for x in es]
    with tx.use_backend('torch'):
        _ops.ema_update_(twin, ms, d)
    got = [same_layout_clone(x) for x in es]

    def no_fallback(*args, **kwargs):
        raise AssertionError('the pure-torch path ran')
    monkeypatch.setattr(_ops._torch_ops, 'ema_update_', no_fallback)
    with tx.use_backend('ext'):
        _ops.ema_update_(got, ms, d)
    assert all(torch.equal(a, b) for a, b in zip(got, twin))
    assert all(a.stride() == b.stride() for a, b in zip(got, es))
    if (edt, mdt) in SEED_ROUNDING_PAIRS or edt == mdt in (torch.float32, torch.float64):
        ref = _seed_formula(es, ms, 0.9993)
        assert all(torch.equal(a, b) for a, b in zip(got, ref))


@pytest.mark.parametrize('edt,mdt', sorted(SEED_ROUNDING_PAIRS, key=str), ids=_name)
def test_every_float_pair_lerp_is_torch_lerp(device, edt, mdt):
    """Mode 'lerp' of the seed-rounding pairs: torch.lerp in the wider dtype rounded into the EMA, as the twin
    computes it, in every bit (the kernels' lerp is torch's one fused multiply-add)."""
    if not (_ops.COMPILED and _ops._has_kernel('ema_update_', device.type)):
        pytest.skip('compiled ops not built')
    es, ms = _pair_inputs(edt, mdt, seed=6, device=device)
    twin, got = [same_layout_clone(x) for x in es], [same_layout_clone(x) for x in es]
    with tx.use_backend('torch'):
        _ops.ema_update_(twin, ms, 0.9993, mode='lerp')
    with tx.use_backend('ext'):
        _ops.ema_update_(got, ms, 0.9993, mode='lerp')
    assert all(torch.equal(a, b) for a, b in zip(got, twin))


def test_half_ema_of_an_fp32_model_continues_after_ema_half(device):
    """The seed's `self.ema.half()  # FP16 EMA` option, switched on after some updates: ModelEMA follows."""
    model = _net(device)
    ours, seed = tx.ModelEMA(model, tau=2), SeedEMA(model, tau=2)
    for step in range(4):
        if step == 2:
            ours.ema.half()
            seed.ema.half()
        _train_and_update(model, ours, seed)
    _assert_same_state(ours.ema, seed.ema)
