"""ModelEMA(skip_nonfinite=True): a NaN/Inf in the model skips the whole update on the device; and
ModelEMA(capturable=True): the decay ramp on the device, so a step with the update can be captured."""
import copy
import math

import pytest
import torch
import torch.nn as nn
from conftest import assert_untouched, snapshot
from seed_oracle import SeedEMA

import torchutils_ext as tx
from torchutils_ext import _ops, _torch_ops


def _net(dtype=torch.float32, device='cpu'):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.SiLU(), nn.Flatten(),
                         nn.Linear(8 * 4 * 4, 3)).to(device=device, dtype=dtype)


def _nudge(model, step):
    g = torch.Generator().manual_seed(step)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(device=p.device, dtype=p.dtype) * 0.01)


def _states_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize('bad', [float('nan'), float('inf'), -float('inf')])
def test_a_poisoned_step_is_skipped_whole(backend, device, bad):
    """A NaN/Inf at step k: the EMA equals the seed's run in which step k only advanced the counter (the ramp
    advances on every call, as documented), bit for bit; skipped == 1; the other steps are the seed's."""
    model = _net(device=device)
    ours, seed = tx.ModelEMA(model, tau=3, skip_nonfinite=True), SeedEMA(model, tau=3)
    for step in range(6):
        _nudge(model, step)
        if step == 3:
            keep = model[4].weight.data[1, 2].item()
            model[4].weight.data[1, 2] = bad
            before = snapshot(ours.ema.state_dict().values())
            ours.update(model)
            assert_untouched(before, list(ours.ema.state_dict().values()))
            seed.updates += 1  # the seed's step k, minus its write
            model[4].weight.data[1, 2] = keep
            continue
        ours.update(model)
        seed.update(model)
    assert ours.updates == seed.updates == 6 and ours.skipped == 1
    assert _states_equal(ours.ema, seed.ema)


def test_inf_in_a_bf16_model_under_an_fp32_ema(backend, device):
    model = _net(torch.bfloat16, device)
    ema = tx.ModelEMA(model, skip_nonfinite=True)
    ema.ema.float()
    ema.update(model)
    model[0].bias.data[0] = float('inf')
    before = snapshot(ema.ema.state_dict().values())
    ema.update(model)
    assert_untouched(before, list(ema.ema.state_dict().values()))
    assert ema.skipped == 1 and ema.updates == 2
    model[0].bias.data[0] = 0.0
    ema.update(model)
    assert ema.skipped == 1 and not _states_equal_to(before, ema)


def _states_equal_to(values, ema):
    return all(torch.equal(a, b) for a, b in zip(values, ema.ema.state_dict().values()))


@pytest.mark.parametrize('edt,mdt', [(torch.float32, torch.float16), (torch.float16, torch.float32),
                                     (torch.float64, torch.float64), (torch.bfloat16, torch.bfloat16)],
                         ids=lambda d: str(d).replace('torch.', ''))
def test_raw_op_guard_every_dtype(backend, device, edt, mdt):
    """The op's guard: [skipped this call, skipped in all]; strided pairs and every dtype's NaN/Inf bits."""
    g = torch.Generator().manual_seed(1)
    e = [torch.randn(300, generator=g).to(device, edt), torch.randn(6, 4, generator=g).to(device, edt).t()]
    m = [torch.randn(300, generator=g).to(device, mdt), torch.randn(6, 4, generator=g).to(device, mdt).t()]
    guard = torch.zeros(2, dtype=torch.int64, device=device)
    ref = snapshot(e)
    _ops.ema_update_(e, m, 0.9, guard=guard)
    assert guard.tolist() == [0, 0]
    _torch_ops.ema_update_(ref, m, 0.9)
    assert all(torch.equal(a, b) for a, b in zip(e, ref))
    for where in (lambda t: t[0].view(-1).__setitem__(299, float('nan')), lambda t: t[1].__setitem__((3, 5), float('inf'))):
        mm = [t.clone() for t in m]
        mm[1] = m[1].t().clone().t()  # keep the strided layout
        where(mm)
        before = snapshot(e)
        _ops.ema_update_(e, mm, 0.9, guard=guard)
        assert_untouched(before, e)
    assert guard.tolist() == [1, 2]
    _ops.ema_update_(e, m, 0.9, guard=guard)
    assert guard.tolist() == [0, 2]


def test_bad_guard_and_options_raise_before_writing(backend, device):
    e, m = [torch.zeros(4, device=device)], [torch.ones(4, device=device)]
    i64 = lambda n: torch.zeros(n, dtype=torch.int64, device=device)  # noqa: E731
    for bad, exc in ((torch.zeros(2, dtype=torch.int32, device=device), TypeError), (i64(3), TypeError),
                     (i64(4)[::2], TypeError), ('guard', TypeError),
                     (torch.zeros(2, dtype=torch.int64, device='meta'), ValueError)):
        with pytest.raises(exc, match='guard'):
            _ops.ema_update_(e, m, 0.5, guard=bad)
    assert torch.equal(e[0], torch.zeros(4, device=device))
    model = _net(device=device)
    for kw in ({'skip_nonfinite': 'yes'}, {'capturable': 1}, {'copy_buffers': None}):
        with pytest.raises(TypeError, match=next(iter(kw))):
            tx.ModelEMA(model, **kw)


def test_capturable_matches_the_host_ramp_bit_for_bit(backend, device):
    """On the CPU the device ramp is the host's: the same EMA bits, the same updates; resume sets the counter. On
    CUDA the device's exp may differ from the host's in the last bit (README): the EMA within a few ulps."""
    model = _net(device=device)
    ours, ref = tx.ModelEMA(model, tau=7, capturable=True), tx.ModelEMA(model, tau=7)
    for step in range(5):
        _nudge(model, step)
        ours.update(model)
        ref.update(model)
    same = _states_equal if device.type == 'cpu' else _states_close
    assert ours.updates == ref.updates == 5 and isinstance(ours.updates, int)
    assert same(ours.ema, ref.ema)
    ckpt = {'updates': ours.updates}  # YOLOv5's checkpoint field
    ours.updates = ref.updates = 1000  # smart_resume
    ours.update(model)
    ref.update(model)
    assert ours.updates == 1001 and same(ours.ema, ref.ema) and ckpt['updates'] == 5
    d = ours._step_args(ours._plan)[0]
    assert d.dtype == torch.float64 and d.device == device
    assert d.item() == ref.decay(1002) if device.type == 'cpu' else math.isclose(d.item(), ref.decay(1002),
                                                                                 rel_tol=1e-15)


def _states_close(a, b):
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7, msg=k)
    return True


def test_capturable_with_the_guard(backend, device):
    model = _net(device=device)
    ours, seed = tx.ModelEMA(model, tau=3, capturable=True, skip_nonfinite=True), SeedEMA(model, tau=3)
    for step in range(4):
        _nudge(model, step)
        if step == 1:
            model[1].running_var.data[0] = float('nan')
            ours.update(model)
            seed.updates += 1
            model[1].running_var.data[0] = 1.0
            continue
        ours.update(model)
        seed.update(model)
    same = _states_equal if device.type == 'cpu' else _states_close  # the device's exp (see above)
    assert ours.updates == 4 and ours.skipped == 1 and same(ours.ema, seed.ema)


@pytest.mark.parametrize('compiler', ['eager', 'aot_eager'])
def test_guarded_capturable_update_compiles_with_fullgraph(backend, device, compiler):
    """Traced, the pure-torch guard keeps the old values with torch.where (no data-dependent branch)."""
    model = _net(device=device)
    ours = tx.ModelEMA(model, tau=3, capturable=True, skip_nonfinite=True)
    ref = tx.ModelEMA(model, tau=3, skip_nonfinite=True)
    step = torch.compile(lambda: ours.update(model), backend=compiler, fullgraph=True)
    torch._dynamo.reset()
    for i in range(4):
        _nudge(model, i)
        if i == 2:
            model[0].weight.data[0, 0, 0, 0] = float('nan')
        step()
        ref.update(model)
        if i == 2:
            model[0].weight.data[0, 0, 0, 0] = 0.0
    assert ours.updates == ref.updates == 4 and ours.skipped == ref.skipped == 1
    for (k, a), b in zip(ours.ema.state_dict().items(), ref.ema.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=k)


def test_traced_guard_path_keeps_the_ema_bits(device, monkeypatch):
    """The no-sync form the pure-torch guard takes on a device or when traced (torch.where over a copy), run
    eagerly: a clean step writes the twin's bits, a poisoned one writes nothing and counts it."""
    g = torch.Generator().manual_seed(3)
    e = [torch.randn(50, generator=g).to(device), torch.randn(3, 3, generator=g).to(device)]
    m = [torch.randn(50, generator=g).to(device), torch.randn(3, 3, generator=g).to(device)]
    ref = snapshot(e)
    _torch_ops.ema_update_(ref, m, 0.75)
    bad_m = [m[0], m[1].clone()]
    bad_m[1][1, 1] = float('nan')
    guard = torch.zeros(2, dtype=torch.int64, device=device)
    monkeypatch.setattr(torch.compiler, 'is_compiling', lambda: True)
    _torch_ops.EmaGroups(e, m).apply(e, m, 0.75, None, 'yolov5', guard)
    assert all(torch.equal(a, b) for a, b in zip(e, ref)) and guard.tolist() == [0, 0]
    _torch_ops.EmaGroups(e, bad_m).apply(e, bad_m, 0.75, None, 'yolov5', guard)
    assert all(torch.equal(a, b) for a, b in zip(e, ref)) and guard.tolist() == [1, 1]


def test_yolov5_checkpoint_and_deepcopy_keep_the_counts(tmp_path, backend, device):
    """YOLOv5 saves {'ema': deepcopy(ema.ema).half(), 'updates': ema.updates} and resumes with
    ema.ema.load_state_dict(...); ema.updates = ckpt['updates']. A deep copy keeps the options and counters."""
    model = _net(device=device)
    ema = tx.ModelEMA(model, capturable=True, skip_nonfinite=True)
    for step in range(3):
        _nudge(model, step)
        ema.update(model)
    torch.save({'ema': copy.deepcopy(ema.ema).half(), 'updates': ema.updates}, tmp_path / 'last.pt')
    ckpt = torch.load(tmp_path / 'last.pt', weights_only=False)
    resumed = tx.ModelEMA(model, capturable=True, skip_nonfinite=True)
    resumed.ema.load_state_dict(ckpt['ema'].float().state_dict())
    resumed.updates = ckpt['updates']
    assert ckpt['updates'] == 3 and resumed.updates == 3
    resumed.update(model)
    assert resumed.updates == 4
    twin = copy.deepcopy(ema)
    assert twin.updates == 3 and twin.skipped == 0 and twin.capturable and twin.skip_nonfinite
    twin.update(model)
    ema.update(model)
    assert twin.updates == ema.updates == 4 and _states_equal(twin.ema, ema.ema)
    assert math.isclose(ema.decay(2), twin.decay(2))


def test_large_finite_values_are_not_taken_for_inf(backend, device):
    """Finite values whose sum overflows (the pure-torch guard's first test) still update."""
    e = [torch.zeros(4, device=device), torch.zeros(3, dtype=torch.float16, device=device)]
    m = [torch.full((4,), 3e38, device=device), torch.full((3,), 6e4, device=device).half()]
    guard = torch.zeros(2, dtype=torch.int64, device=device)
    _ops.ema_update_(e, m, 0.5, guard=guard)
    assert guard.tolist() == [0, 0] and torch.equal(e[0], torch.full((4,), 1.5e38, device=device))


def test_counter_and_guard_keep_one_address_for_compiled_cuda_graphs(device):
    """The capturable counter and the guard are mutated by every update: marked static for torch.compile, so that
    mode='reduce-overhead' records the step into a CUDA graph instead of skipping it for a mutated input that is
    neither a parameter nor a buffer (tests/test_cuda.py proves the graph on a GPU). A guard made at an update
    (one unpickled from before it existed) is marked too."""
    from torch._dynamo.utils import get_static_address_type
    model = _net(device=device)
    ema = tx.ModelEMA(model, capturable=True, skip_nonfinite=True)
    assert get_static_address_type(ema._count) and get_static_address_type(ema._guard)
    ema.update(model)
    ema._guard = None
    ema.update(model)
    assert ema._guard.device == device and ema.updates == 2 and get_static_address_type(ema._guard)
    assert not get_static_address_type(_net(device=device)[0].weight.detach().clone())  # not every tensor
