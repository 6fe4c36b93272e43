"""In-place ops as autograd sees them, and the wrappers under torch.compile(fullgraph=True), on both backends."""
import pytest
import torch
import torch.nn as nn
from conftest import assert_untouched, snapshot

import torchutils_ext as tx
from torchutils_ext import _ops


class _Conv(nn.Module):  # a YOLOv5 Conv block
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.SiLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))

    def forward_fuse(self, x):
        return self.act(self.conv(x))


def test_backward_after_fuse_model_is_refused(backend):
    torch.manual_seed(0)
    m = nn.Sequential(_Conv(), _Conv()).eval()
    m[1].conv = nn.Conv2d(4, 4, 3, bias=False)
    y = m(torch.randn(1, 3, 9, 9)).sum()
    v0 = m[0].conv.weight._version
    tx.fuse_model(m)
    assert m[0].conv.weight._version > v0  # the fold wrote the weight in place, and says so
    with pytest.raises(RuntimeError, match='modified by an inplace operation'):
        y.backward()


@pytest.mark.parametrize('op', ['ema', 'fold'])
def test_wrappers_bump_versions(backend, op):
    if op == 'ema':
        e, m = [torch.ones(3), torch.ones(2, 2)], [torch.zeros(3), torch.zeros(2, 2)]
        v = [t._version for t in e]
        _ops.ema_update_(e, m, 0.5)
        assert all(t._version > x for t, x in zip(e, v))
    else:
        w = [torch.ones(4, 2, 1, 1)]
        v = w[0]._version
        _ops.fold_conv_bn(w, [None], [None], [None], [torch.zeros(4)], [torch.ones(4)], [1e-5], [0], inplace=True)
        assert w[0]._version > v


def _raw_ema(e, m):
    if _ops.COMPILED:
        return torch.ops.torchutils_ext.ema_update_(e, m, 0.5, 'yolov5')
    from torchutils_ext import _torch_ops
    return _torch_ops.ema_update_(e, m, 0.5, 'yolov5')


def test_raw_op_refuses_what_torch_in_place_ops_refuse():
    """torch.ops.torchutils_ext.ema_update_ in grad mode on a leaf that requires grad, and on an inference tensor
    outside inference mode: refused as `leaf.mul_(0.5)` is, before any write."""
    leaf = torch.ones(3, requires_grad=True)
    with pytest.raises(RuntimeError) as torch_says:
        leaf.mul_(0.5)
    e, m = [torch.ones(3), leaf], [torch.zeros(3), torch.zeros(3)]
    before = snapshot(e)
    with pytest.raises(RuntimeError, match='leaf'):
        _raw_ema(e, m)
    assert_untouched(before, e)
    assert 'leaf' in str(torch_says.value)
    with torch.no_grad():  # where torch allows it, so do we
        _raw_ema(e, m)
    assert torch.equal(leaf.detach(), torch.full((3,), 0.5))

    with torch.inference_mode():
        inf = torch.ones(3)
    e2 = [torch.ones(3), inf]
    before = snapshot(e2)
    with pytest.raises(RuntimeError, match='nference'):
        _raw_ema(e2, m)
    assert_untouched(before, e2)
    with torch.inference_mode():
        _raw_ema(e2, [torch.zeros(3), torch.zeros(3)])
    assert torch.equal(inf, torch.full((3,), 0.5))


@pytest.mark.parametrize('compiler', ['eager', 'aot_eager', 'inductor'])
def test_model_ema_update_compiles_with_fullgraph(backend, compiler):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    ours = tx.ModelEMA(model, tau=2)
    ref = tx.ModelEMA(model, tau=2)
    step = torch.compile(lambda: ours.update(model), backend=compiler, fullgraph=True)
    torch._dynamo.reset()
    for i in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * (i + 1))
        step()
        ref.update(model)
    assert ours.updates == ref.updates == 3
    for (k, a), b in zip(ours.ema.state_dict().items(), ref.ema.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=k)


@pytest.mark.parametrize('compiler', ['eager', 'aot_eager'])
def test_op_wrappers_compile_with_fullgraph(backend, compiler):
    def f(e, m, w, mean, var):
        _ops.ema_update_(e, m, 0.25)
        ws, bs = _ops.fold_conv_bn(w, [None], [None], [None], [mean], [var], [1e-5], [0])
        return ws[0] + 1, bs[0], _ops.count_zeros(e)

    def args():
        return ([torch.ones(4)], [torch.zeros(4)], [torch.full((3, 2, 1, 1), 2.0)], torch.zeros(3), torch.ones(3))
    want = f(*args())
    got = torch.compile(f, backend=compiler, fullgraph=True)(*args())
    for a, b in zip(want, got):
        torch.testing.assert_close(a, b)
