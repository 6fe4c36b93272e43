"""ModelEMA's round-2 options, each against a plain Python restatement of the peer it comes from:
schedule= (timm's warm-up, constant, torchtitan's half-life), update_every_n_steps (Lightning/NeMo/torchtitan),
update_after_step (timm's copy phase), buffers= (average / copy / keep), swap_ema_weights (NeMo), and the exact
ends of the kernels they rely on (decay 1 writes nothing, decay 0 copies). Each on both backends; with
capturable=True bit-equal to eager; with skip_nonfinite=True inside an every-N window."""
import copy
import io
import math

import pytest
import torch
import torch.nn as nn
from conftest import assert_untouched, snapshot

import torchutils_ext as tx
from torchutils_ext import _ops, _torch_ops


def net(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.SiLU(), nn.Flatten(),
                         nn.Linear(4 * 4 * 4, 3)).to(dtype)


def train(model, step):
    """One optimizer step's worth of change: parameters and float buffers move, num_batches_tracked counts."""
    g = torch.Generator().manual_seed(100 + step)
    with torch.no_grad():
        for k, t in model.state_dict().items():
            if t.dtype.is_floating_point:
                t.add_(torch.randn(t.shape, generator=g).to(t.dtype) * 0.1)
            else:
                t.add_(1)


def same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# -- plain restatements of the peers' formulas (no package code)

def timm_decay(step, decay=0.9999, min_decay=0.0, update_after_step=0, gamma=1.0, power=2 / 3):
    """timm ModelEmaV3.get_decay(step) with use_warmup=True, as timm writes it."""
    step = max(0, step - update_after_step - 1)
    if step <= 0:
        return 0.0
    d = 1 - (1 + step / gamma) ** -power
    return max(min(d, decay), min_decay)


def torchtitan_decay(num_updates, fraction):
    return 2.0 ** (-1.0 / (fraction * num_updates))


class RefEMA:
    """The seed's update (``v *= d; v += (1 - d) * m``) driven by a decay function of the optimizer step, with a
    copy for decay 0 (timm's lerp with weight 1) and nothing done for None; buffers per policy."""

    def __init__(self, model, decay_of_step, buffers='average'):
        self.ema = copy.deepcopy(model).eval()
        self.decay_of_step, self.buffers, self.step = decay_of_step, buffers, 0

    def update(self, model):
        self.step += 1
        d = self.decay_of_step(self.step)
        if d is None:
            return
        params = {k for k, _ in model.named_parameters()}
        msd = model.state_dict()
        with torch.no_grad():
            for k, v in self.ema.state_dict().items():
                m = msd[k]
                if k not in params and self.buffers == 'keep':
                    continue
                if k not in params and self.buffers == 'copy':
                    v.copy_(m)
                elif v.dtype.is_floating_point:
                    if d == 0.0:
                        v.copy_(m)
                    else:
                        v *= d
                        v += (1 - d) * m


def run(ours, ref, model, steps, capturable_twin=None):
    for step in range(steps):
        train(model, step)
        ours.update(model)
        ref.update(model)
        assert same(ours.ema, ref.ema), f'step {step + 1}'
        if capturable_twin is not None:
            capturable_twin.update(model)
            assert same(capturable_twin.ema, ours.ema), f'capturable, step {step + 1}'


@pytest.mark.parametrize('after', [None, 0, 3])
@pytest.mark.parametrize('min_decay', [0.0, 0.5])
def test_timm_warmup_schedule(backend, after, min_decay):
    """schedule='warmup' with update_after_step is timm's ModelEmaV3(use_warmup=True).update(model, step=s)."""
    model = net()
    kw = dict(schedule='warmup', decay=0.99, min_decay=min_decay, warmup_gamma=2.0, warmup_power=0.75)
    ours = tx.ModelEMA(model, update_after_step=after, **kw)
    dev = tx.ModelEMA(model, update_after_step=after, capturable=True, **kw)
    if after is None:  # no copy phase: x is the step itself
        ref = RefEMA(model, lambda s: timm_decay(s + 1, 0.99, min_decay, 0, 2.0, 0.75))
    else:
        ref = RefEMA(model, lambda s: timm_decay(s, 0.99, min_decay, after, 2.0, 0.75))
    run(ours, ref, model, 9, dev)
    assert ours.updates == dev.updates == 9
    assert ours.decay(10 ** 6) == 0.99 and dev._table.settled


@pytest.mark.parametrize('schedule,kw,formula', [
    ('constant', {'decay': 0.8}, lambda x: 0.8),
    ('half_life', {'half_life_fraction': 0.3}, lambda x: torchtitan_decay(x, 0.3)),
    ('ramp', {'decay': 0.9, 'tau': 3}, lambda x: 0.9 * (1 - math.exp(-x / 3))),
])
@pytest.mark.parametrize('every', [1, 3])
def test_schedules_with_every_n_steps(backend, schedule, kw, formula, every):
    """Every n-th step averages, the first included (Lightning's step_idx % n == 0, NeMo, torchtitan); x counts
    the averaging updates (torchtitan counts firings)."""
    model = net()
    ours = tx.ModelEMA(model, schedule=schedule, update_every_n_steps=every, **kw)
    dev = tx.ModelEMA(model, schedule=schedule, update_every_n_steps=every, capturable=True, **kw)
    ref = RefEMA(model, lambda s: formula((s - 1) // every + 1) if (s - 1) % every == 0 else None)
    run(ours, ref, model, 8, dev)
    assert ours.updates == dev.updates == 8 and ours.update_every_n_steps == every


def test_every_n_with_a_copy_phase(backend):
    """update_after_step=1 and every 2: steps 1, 2 copy; 3, 5, 7 average with x = 1, 2, 3; 4, 6 write nothing."""
    model = net()
    decays = {1: 0.0, 2: 0.0, 3: 0.9 * (1 - math.exp(-1 / 2)), 5: 0.9 * (1 - math.exp(-2 / 2)),
              7: 0.9 * (1 - math.exp(-3 / 2))}
    ours = tx.ModelEMA(model, decay=0.9, tau=2, update_every_n_steps=2, update_after_step=1)
    dev = tx.ModelEMA(model, decay=0.9, tau=2, update_every_n_steps=2, update_after_step=1, capturable=True)
    run(ours, RefEMA(model, decays.get), model, 7, dev)
    assert ours.update_after_step == 1


@pytest.mark.parametrize('capturable', [False, True])
def test_copy_steps_are_exact(backend, capturable):
    """A copy step gives the model's bits where decay 0 in the formula would not: an Inf or NaN already in the EMA
    (0 * inf = NaN) and -0.0 in the model (+0 + -0 = +0)."""
    model = net()
    ema = tx.ModelEMA(model, update_after_step=1, capturable=capturable)
    with torch.no_grad():
        ema.ema[0].weight[0, 0, 0, 0] = float('inf')
        ema.ema[0].weight[0, 0, 0, 1] = float('nan')
        model[0].weight[0, 0, 0, 2] = -0.0
        ema.ema[0].weight[0, 0, 0, 2] = 1.0
    for _ in range(2):
        ema.update(model)
        for k, v in ema.ema.state_dict().items():
            if v.dtype.is_floating_point:
                want = model.state_dict()[k]
                assert torch.equal(v, want) and torch.equal(v.signbit(), want.signbit()), k
    train(model, 0)
    ema.update(model)  # the first averaging update
    assert not same(ema.ema, model)


@pytest.mark.parametrize('capturable', [False, True])
def test_a_skipped_step_writes_nothing_even_with_inf_in_the_model(backend, capturable):
    """Expressing "no update" as decay 1 would still write 1 * v + 0 * inf = NaN; the step writes nothing."""
    model = net()
    ema = tx.ModelEMA(model, update_every_n_steps=2, capturable=capturable)
    ema.update(model)
    with torch.no_grad():
        model[4].weight[0, 0] = float('inf')
        model[0].bias[0] = float('nan')
    before = snapshot(ema.ema.state_dict().values())
    ema.update(model)
    assert_untouched(before, list(ema.ema.state_dict().values()))
    assert ema.updates == 2


@pytest.mark.parametrize('capturable', [False, True])
@pytest.mark.parametrize('where', ['off', 'on'])
def test_guard_inside_an_every_n_window(backend, capturable, where):
    """Every 3 steps; a NaN at step 5 (not a firing step: nothing to skip, nothing counted) or at step 4 (a firing
    step: skipped and counted). The EMA otherwise follows the reference."""
    model = net()
    ema = tx.ModelEMA(model, decay=0.9, tau=2, update_every_n_steps=3, skip_nonfinite=True, capturable=capturable)
    bad_step = 5 if where == 'off' else 4
    ramp = lambda x: 0.9 * (1 - math.exp(-x / 2))  # noqa: E731
    ref = RefEMA(model, lambda s: None if (s - 1) % 3 or s == bad_step else ramp((s - 1) // 3 + 1))
    for step in range(1, 8):
        train(model, step)
        if step == bad_step:
            keep = model[4].weight[1, 1].item()
            with torch.no_grad():
                model[4].weight[1, 1] = float('nan')
            before = snapshot(ema.ema.state_dict().values())
            ema.update(model)
            ref.update(model)
            assert_untouched(before, list(ema.ema.state_dict().values()))
            with torch.no_grad():
                model[4].weight[1, 1] = keep
            continue
        ema.update(model)
        ref.update(model)
        assert same(ema.ema, ref.ema), step
    assert ema.skipped == (0 if where == 'off' else 1) and ema.updates == 7


@pytest.mark.parametrize('buffers', ['average', 'copy', 'keep'])
@pytest.mark.parametrize('capturable', [False, True])
def test_buffer_policies(backend, buffers, capturable):
    """'average' is the seed; 'copy' (timm exclude_buffers) copies every buffer, num_batches_tracked included;
    'keep' (torch use_buffers=False, NeMo, torchtitan) leaves the EMA's buffers as built. Parameters are averaged
    under each. With every-N, a step that does not average copies nothing either."""
    model = net()
    built = copy.deepcopy(model.state_dict())
    ema = tx.ModelEMA(model, decay=0.9, tau=2, buffers=buffers, update_every_n_steps=2, capturable=capturable)
    ramp = lambda x: 0.9 * (1 - math.exp(-x / 2))  # noqa: E731
    ref = RefEMA(model, lambda s: None if (s - 1) % 2 else ramp((s - 1) // 2 + 1), buffers)
    run(ema, ref, model, 5)
    sd = ema.ema.state_dict()
    nbt = int(sd['1.num_batches_tracked'])
    if buffers == 'copy':
        assert nbt == 5 and torch.equal(sd['1.running_var'], model.state_dict()['1.running_var'])
    elif buffers == 'keep':
        assert nbt == 0 and torch.equal(sd['1.running_mean'], built['1.running_mean'])
    else:
        assert nbt == 0 and not torch.equal(sd['1.running_mean'], built['1.running_mean'])


def test_buffer_copy_with_the_guard_on_a_poisoned_step(backend):
    """buffers='copy' under skip_nonfinite: a skipped step copies no buffer either (decided on the device)."""
    model = net()
    ema = tx.ModelEMA(model, buffers='copy', skip_nonfinite=True, capturable=True)
    train(model, 0)
    ema.update(model)
    train(model, 1)
    with torch.no_grad():
        model[1].running_var[0] = float('inf')
    before = snapshot(ema.ema.state_dict().values())
    ema.update(model)
    assert_untouched(before, list(ema.ema.state_dict().values()))
    assert ema.skipped == 1


def test_swap_ema_weights_restores_bit_for_bit(backend):
    model = net()
    ema = tx.ModelEMA(model, decay=0.5, tau=1)
    for step in range(3):
        train(model, step)
        ema.update(model)
    with torch.no_grad():
        model[0].weight[0, 0, 0, 0] = -0.0
        model[4].bias[0] = float('nan')
    own = copy.deepcopy(model.state_dict())
    params = [id(p) for p in model.parameters()]
    x = torch.randn(2, 3, 6, 6)
    with ema.swap_ema_weights(model) as m:
        assert m is model
        assert same_floats(model, ema.ema)
        torch.testing.assert_close(model.eval()(x), ema.ema(x), rtol=0, atol=0)
    assert bitwise(model.state_dict(), own) and [id(p) for p in model.parameters()] == params
    with pytest.raises(KeyError, match='boom'):
        with ema.swap_ema_weights(model):
            model[0].weight.data.mul_(3)  # the body may even write the model
            raise KeyError('boom')
    assert bitwise(model.state_dict(), own)
    with ema.swap_ema_weights(model, enabled=False):
        assert bitwise(model.state_dict(), own)


def same_floats(model, ema_model):
    sm, se = model.state_dict(), ema_model.state_dict()
    return all(torch.equal(sm[k], se[k].to(sm[k].dtype)) for k in se if se[k].dtype.is_floating_point)


def bitwise(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k].view(-1).view(torch.uint8) if a[k].is_floating_point()
                                                    else a[k], b[k].view(-1).view(torch.uint8)
                                                    if b[k].is_floating_point() else b[k]) for k in a)


def test_swap_with_a_half_ema_and_the_keep_policy(backend):
    """A half EMA is evaluated in the fp32 model at its own values; buffers='keep' swaps the parameters only."""
    model = net()
    ema = tx.ModelEMA(model, buffers='keep')
    ema.ema.half()
    train(model, 0)
    ema.update(model)
    own = copy.deepcopy(model.state_dict())
    with ema.swap_ema_weights(model):
        for k, p in model.named_parameters():
            assert p.dtype == torch.float32 and torch.equal(p, ema.ema.get_parameter(k).float())
        assert torch.equal(model[1].running_mean, own['1.running_mean'])  # the model's own buffers stay
    assert bitwise(model.state_dict(), own)


@pytest.mark.parametrize('change', ['fuse', 'add', 'reshape'])
def test_swap_refuses_a_changed_model(backend, change):
    model = net()
    ema = tx.ModelEMA(model)
    if change == 'fuse':
        model[1] = nn.Identity()
    elif change == 'add':
        model.add_module('head', nn.Linear(3, 2))
    else:
        model[4].bias = nn.Parameter(torch.zeros(5))
    own, theirs = copy.deepcopy(model.state_dict()), copy.deepcopy(ema.ema.state_dict())
    with pytest.raises(tx.ModelStructureError, match='no longer matches'):
        with ema.swap_ema_weights(model):
            pytest.fail('the body must not run')
    assert bitwise(model.state_dict(), own) and bitwise(ema.ema.state_dict(), theirs)


@pytest.mark.parametrize('decay', [0.0, 1.0])
@pytest.mark.parametrize('edt,mdt', [(torch.float32, torch.float32), (torch.float16, torch.float32),
                                     (torch.float32, torch.bfloat16), (torch.float64, torch.float16)],
                         ids=lambda d: str(d).replace('torch.', ''))
@pytest.mark.parametrize('as_tensor', [False, True])
def test_raw_op_exact_ends(backend, decay, edt, mdt, as_tensor):
    """[exact ends]: decay 1 leaves every bit (also beside an Inf in the model), decay 0 gives copy_'s bits (also
    over an Inf in the EMA and a -0.0 in the model); strided pairs too."""
    g = torch.Generator().manual_seed(2)
    e = [torch.randn(40, generator=g).to(edt), torch.randn(5, 6, generator=g).to(edt).t()]
    m = [torch.randn(40, generator=g).to(mdt), torch.randn(6, 5, generator=g).to(mdt)]
    e[0][3], m[0][4], m[0][5], e[0][6] = float('inf'), float('inf'), -0.0, float('nan')
    want = snapshot(e) if decay == 1.0 else [x.clone().copy_(y) for x, y in zip(snapshot(e), m)]
    _ops.ema_update_(e, m, torch.tensor(decay, dtype=torch.float64) if as_tensor else decay)
    for a, b in zip(e, want):
        assert torch.equal(a.view(-1).view(torch.uint8) if a.is_contiguous() else a.contiguous().view(torch.uint8),
                           b.contiguous().view(torch.uint8))


def test_device_path_of_the_twin_selects_the_ends(monkeypatch):
    """The pure-torch update where only the device knows the decay (traced, or a device tensor): where-selection
    gives the kernels' results for decay 0 and 1 and for a guard; run eagerly here by posing as traced."""
    g = torch.Generator().manual_seed(5)
    m = [torch.randn(30, generator=g), torch.randn(4, 4, generator=g)]
    m[0][0], m[0][1] = float('inf'), -0.0
    monkeypatch.setattr(torch.compiler, 'is_compiling', lambda: True)
    for d in (0.0, 1.0, 0.7):
        e = [torch.randn(30, generator=g), torch.randn(4, 4, generator=g)]
        e[0][2] = float('nan')
        want = snapshot(e)
        monkeypatch.setattr(torch.compiler, 'is_compiling', lambda: False)
        _torch_ops.ema_update_(want, m, d)  # the host branch
        monkeypatch.setattr(torch.compiler, 'is_compiling', lambda: True)
        guard = torch.zeros(2, dtype=torch.int64)
        _torch_ops.EmaGroups(e, m).apply(e, m, 0.0, torch.tensor(d, dtype=torch.float64), 'yolov5')
        assert all(torch.equal(a.view(torch.int32), b.view(torch.int32)) for a, b in zip(e, want)), d
        guard.zero_()
        _torch_ops.EmaGroups(e, m).apply(e, m, 0.0, torch.tensor(d, dtype=torch.float64), 'yolov5', guard)
        assert guard.tolist() == ([0, 0] if d == 1.0 else [1, 1])  # inf in the model: skipped unless decay 1


def test_copied_entries_follow_a_device_decay(monkeypatch):
    """The copied entries (buffers='copy', copy_buffers) where only the device knows the decay (posed as traced):
    copied for a decay in [0, 1), left for 1 (no averaging step) and for a NaN or out-of-range decay, which
    averages nothing either ([decay tensor])."""
    from torchutils_ext._ema_plan import copy_entries
    monkeypatch.setattr(torch.compiler, 'is_compiling', lambda: True)
    m = [torch.tensor([5, 6]), torch.tensor([1.5, float('inf')]), torch.tensor([True, False])]
    for d in (0.0, 0.5, 1.0, float('nan'), 1.5, -0.5):
        e = [torch.tensor([1, 2]), torch.tensor([0.0, -1.0]), torch.tensor([False, True])]
        before = snapshot(e)
        copy_entries(e, m, torch.tensor(d, dtype=torch.float64), None)
        want = m if 0.0 <= d < 1.0 else before
        assert all(torch.equal(a, b) for a, b in zip(e, want)), d


def test_half_life_past_its_table_limit(monkeypatch, backend):
    """half_life never settles, so its capturable table stops at TABLE_LIMIT (not the seed ramp's larger limit);
    before it the device value is the host's bit for bit, past it torchtitan's formula on the device."""
    from torchutils_ext import _ema_schedule
    monkeypatch.setattr(_ema_schedule, 'TABLE_LIMIT', 6)
    _ema_schedule.host_values.cache_clear()
    try:
        model = net()
        dev = tx.ModelEMA(model, schedule='half_life', half_life_fraction=0.3, capturable=True)
        ramp = tx.ModelEMA(model, capturable=True)
        assert dev._table.values.numel() == 6 and not dev._table.settled and ramp._table.settled
        for done in (0, 4, 5, 6, 40):
            got = _ema_schedule.device_decay(torch.full((1,), float(done), dtype=torch.float64), dev._schedule,
                                             dev._table).item()
            want = torchtitan_decay(done + 1, 0.3)
            if done + 1 < 6:
                assert got == want
            else:
                assert math.isclose(got, want, rel_tol=1e-15)
    finally:
        _ema_schedule.host_values.cache_clear()


def test_options_survive_pickle_and_deepcopy(backend):
    model = net()
    ema = tx.ModelEMA(model, schedule='warmup', min_decay=0.1, update_every_n_steps=2, update_after_step=0,
                      buffers='copy', capturable=True)
    train(model, 0)
    ema.update(model)
    buf = io.BytesIO()
    torch.save(ema, buf)
    buf.seek(0)
    start = copy.deepcopy(model.state_dict())
    runs = []
    for twin in (ema, torch.load(buf, weights_only=False), copy.deepcopy(ema)):
        assert (twin.schedule, twin.update_every_n_steps, twin.update_after_step, twin.buffers) == \
            ('warmup', 2, 0, 'copy')
        model.load_state_dict(start)
        for step in range(1, 4):
            train(model, step)
            twin.update(model)
        assert twin.updates == 4
        runs.append(twin.ema)
    assert same(runs[0], runs[1]) and same(runs[0], runs[2])


@pytest.mark.parametrize('kw,exc,match', [
    ({'schedule': 'cosine'}, ValueError, 'schedule'),
    ({'min_decay': 0.5}, ValueError, 'min_decay is not used'),
    ({'schedule': 'warmup', 'half_life_fraction': 0.1}, ValueError, 'half_life_fraction is not used'),
    ({'schedule': 'warmup', 'warmup_power': 0}, ValueError, 'warmup_power'),
    ({'schedule': 'warmup', 'min_decay': 1.5}, ValueError, 'min_decay'),
    ({'schedule': 'half_life', 'half_life_fraction': -1}, ValueError, 'half_life_fraction'),
    ({'schedule': 'warmup', 'warmup_gamma': '1'}, TypeError, 'warmup_gamma'),
    ({'schedule': 'constant', 'tau': 10}, ValueError, 'tau is used'),
    ({'schedule': 'half_life', 'decay': 0.9}, ValueError, 'decay is not used'),
    ({'update_every_n_steps': 0}, ValueError, 'update_every_n_steps'),
    ({'update_every_n_steps': 2.0}, ValueError, 'update_every_n_steps'),
    ({'update_after_step': -1}, ValueError, 'update_after_step'),
    ({'buffers': 'none'}, ValueError, 'buffers'),
    ({'buffers': 'keep', 'copy_buffers': True}, ValueError, 'choose one'),
])
def test_bad_options_raise(kw, exc, match):
    with pytest.raises(exc, match=match):
        tx.ModelEMA(net(), **kw)


def test_the_default_is_the_seed_path():
    """No option given: no phases, the seed's ramp object, and every step averages."""
    ema = tx.ModelEMA(net())
    assert ema._phases is None and ema.schedule == 'ramp' and not ema._ends
    assert (ema.update_every_n_steps, ema.update_after_step, ema.buffers) == (1, None, 'average')


@pytest.mark.parametrize('compiler', ['eager', 'aot_eager'])
def test_options_compile_with_fullgraph(backend, compiler):
    """A capturable update with every-N and a copy phase traces whole: the phases are decided from the device
    counter, no host read."""
    model = net()
    kw = dict(decay=0.9, tau=2, update_every_n_steps=2, update_after_step=0, buffers='copy')
    ours, ref = tx.ModelEMA(model, capturable=True, **kw), tx.ModelEMA(model, **kw)
    step = torch.compile(lambda: ours.update(model), backend=compiler, fullgraph=True)
    torch._dynamo.reset()
    for i in range(5):
        train(model, i)
        step()
        ref.update(model)
    assert ours.updates == ref.updates == 5
    for (k, a), b in zip(ours.ema.state_dict().items(), ref.ema.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=k)
