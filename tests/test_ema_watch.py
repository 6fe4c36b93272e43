"""ModelEMA averages exactly what the seed averages, whatever happens to the model and its EMA between updates.

The seed walks both state_dicts on every update; our plan proves each step that nothing changed (the state watch,
csrc/python/watch.h, and its Python twin Layout.read). Each case below changes the model and/or the EMA after a
first update, then checks that (1) the compiled watch and its Python twin agree on whether the plan is still
current, and (2) the next update leaves the EMA bit-identical to the seed's, which is run beside it.
"""
import copy
import gc
import math
import weakref

import pytest
import torch
import torch.nn as nn
from seed_oracle import SeedModelEMA

import torchutils_ext as tx
from torchutils_ext import _ema_plan, _ops


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.SiLU(),
                         nn.Conv2d(4, 4, 1), nn.Flatten(), nn.Linear(4 * 4 * 4, 4, bias=False))


def train(model, steps=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _ in range(steps):
            for t in model.state_dict().values():
                if t.dtype.is_floating_point:
                    t.add_(torch.randn(t.shape, generator=g).to(t.dtype) * 0.1)


def same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def both_watches(plan, ema, model):
    """(current per the plan's C++ watch or None without one, current per the Python twin)."""
    py = plan.layout.read(ema, model) is not None if plan.layout is not None else False
    watch = getattr(plan, 'watch', None)
    c = None if watch is None else _ops._C.watch_read(watch, ema, model) is not None
    return c, py


def _add_submodule(model, ema):
    for m in (model, ema):
        m.add_module('extra', nn.Linear(2, 2))
    ema.extra.load_state_dict(model.extra.state_dict())


def _add_buffer(model, ema):
    for m in (model, ema):
        m[1].register_buffer('extra', torch.ones(4))


def _param_on_stateless(model, ema):  # SiLU holds nothing: only the registration hook can see this
    for m in (model, ema):
        m[2].register_parameter('w', nn.Parameter(torch.ones(3)))


def _fill_none_slot(model, ema):
    for m in (model, ema):
        m[0].bias = nn.Parameter(torch.zeros(4))


def _fill_none_slot_directly(model, ema):  # bypasses nn.Module's API and its hooks
    for m in (model, ema):
        m[0]._parameters['bias'] = nn.Parameter(torch.zeros(4))


def _transpose_square(model, ema):  # a 4x4x1x1 weight: same data pointer and shape, other strides
    model[3].weight.data = model[3].weight.data.transpose(0, 1)


def _replace_stateless(model, ema):
    for m in (model, ema):
        m[2] = nn.ReLU()


CHANGES = {
    'submodule added to both': _add_submodule,
    'buffer added to both': _add_buffer,
    'parameter on a stateless module': _param_on_stateless,
    'None slot filled': _fill_none_slot,
    'None slot filled in the dict': _fill_none_slot_directly,
    'square weight transposed (same pointer and shape)': _transpose_square,
    'stateless module replaced': _replace_stateless,
}


@pytest.mark.parametrize('change', list(CHANGES), ids=list(CHANGES))
def test_changes_are_seen_and_averaged_as_the_seed_does(backend, change):
    model = net()
    ours, seed = tx.ModelEMA(model, tau=5), SeedModelEMA(model, tau=5)
    train(model)
    ours.update(model)
    seed.update(model)
    plan = ours._plan
    assert same_state(ours.ema, seed.ema)
    CHANGES[change](model, ours.ema)
    seed.ema = copy.deepcopy(ours.ema)  # the seed's EMA: the same state and, after the change, structure
    c, py = both_watches(plan, ours.ema, model)
    if change != 'stateless module replaced':
        assert py is False and c in (None, False)
    assert c is None or c == py
    for step in range(2):
        train(model, seed=step + 1)
        ours.update(model)
        seed.update(model)
        assert same_state(ours.ema, seed.ema)


def test_buffer_made_persistent_is_averaged_and_made_transient_is_left(backend):
    model = net()
    model[1].register_buffer('tmp', torch.ones(4), persistent=False)
    ours = tx.ModelEMA(model, tau=5)
    seed = SeedModelEMA(model, tau=5)
    train(model)
    ours.update(model)
    seed.update(model)
    before = ours.ema[1].tmp.clone()
    for m in (model, ours.ema, seed.ema):
        m[1].register_buffer('tmp', m[1].tmp, persistent=True)  # now in state_dict(): the seed averages it
    model[1].tmp.add_(1)
    ours.update(model)
    seed.update(model)
    assert same_state(ours.ema, seed.ema) and not torch.equal(ours.ema[1].tmp, before)
    for m in (model, ours.ema, seed.ema):
        m[1].register_buffer('running_var', m[1].running_var, persistent=False)  # out of state_dict(): left
    kept = ours.ema[1].running_var.clone()
    train(model, seed=3)
    ours.update(model)
    seed.update(model)
    assert same_state(ours.ema, seed.ema) and torch.equal(ours.ema[1].running_var, kept)


@pytest.mark.parametrize('convert', ['double', 'half', 'channels_last', 'load_state_dict', 'assign'])
def test_swap_tensors_conversions_work_after_an_update(backend, convert):
    """With swap_module_params_on_conversion, .double()/.half()/channels_last and load_state_dict swap each
    tensor's contents (torch.utils.swap_tensors), which refuses a tensor something else references: the plan
    references none between steps."""
    model = net()
    ours, seed = tx.ModelEMA(model, tau=5), SeedModelEMA(model, tau=5)
    train(model)
    ours.update(model)
    seed.update(model)
    prev = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        if convert == 'double':
            for m in (model, ours.ema, seed.ema):
                m.double()
        elif convert == 'half':
            model.half()  # fp32 EMA of an fp16 model (the seed then computes (1 - d) * m in half: compared below)
        elif convert == 'channels_last':
            for m in (model, ours.ema, seed.ema):
                m.to(memory_format=torch.channels_last)
        elif convert == 'load_state_dict':  # smart_resume's form
            ours.ema.load_state_dict(seed.ema.state_dict())
        else:
            ours.ema.load_state_dict(copy.deepcopy(seed.ema.state_dict()), assign=True)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(prev)
    train(model, seed=1)
    ours.update(model)
    seed.update(model)
    if convert == 'half':  # documented: ours rounds (1 - d) * m in fp32, the seed in fp16
        for (k, a), b in zip(ours.ema.state_dict().items(), seed.ema.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=0, atol=2e-3, msg=k)
    else:
        assert same_state(ours.ema, seed.ema)
    torch.utils.swap_tensors(model[0].weight, nn.Parameter(model[0].weight.detach().clone()))  # no reference held


def test_a_deleted_model_is_freed_without_another_update(backend):
    model = net()
    ema = tx.ModelEMA(model)
    ema.update(model)
    gone = weakref.ref(model[0].weight)
    assert ema._plan is not None
    del model
    gc.collect()
    assert gone() is None
    fresh = net()
    ema.update(fresh)  # a new model: a new plan
    assert ema.updates == 2


def test_ema_that_requires_grad_is_updated(backend):
    model = net()
    ours, seed = tx.ModelEMA(model, tau=5), SeedModelEMA(model, tau=5)
    ours.ema.requires_grad_(True)
    for _ in range(2):
        train(model)
        ours.update(model)
        seed.update(model)
    assert same_state(ours.ema, seed.ema)


def test_first_update_in_inference_mode_then_outside(backend):
    model = net()
    ours, seed = tx.ModelEMA(model, tau=5), SeedModelEMA(model, tau=5)
    train(model)
    with torch.inference_mode():
        ours.update(model)
        seed.update(model)
    for step in range(2):
        train(model, seed=step + 1)
        ours.update(model)
        seed.update(model)
    assert same_state(ours.ema, seed.ema)


@pytest.mark.parametrize('copy_buffers', [False, True])
def test_model_missing_only_an_integer_entry(backend, copy_buffers):
    """A BN whose num_batches_tracked is None in the model (frozen mid-training): the seed looks up floating
    entries only, and so do we; copy_buffers leaves the entry the model lacks as it is."""
    model = net()
    ours, seed = tx.ModelEMA(model, tau=5, copy_buffers=copy_buffers), SeedModelEMA(model, tau=5)
    model[1].num_batches_tracked = None
    for step in range(2):
        train(model, seed=step)
        ours.update(model)
        seed.update(model)
    assert same_state(ours.ema, seed.ema)


def test_skipped_step_leaves_the_integer_buffers_too(backend):
    model = net()
    ema = tx.ModelEMA(model, skip_nonfinite=True, copy_buffers=True)
    model.train()(torch.randn(2, 3, 6, 6))  # num_batches_tracked 1
    ema.update(model)
    assert int(ema.ema[1].num_batches_tracked) == 1
    model(torch.randn(2, 3, 6, 6))  # 2
    with torch.no_grad():
        model[3].weight[0, 0, 0, 0] = float('nan')
    before = copy.deepcopy(ema.ema.state_dict())
    ema.update(model)
    assert ema.skipped == 1 and same_state_dict(ema.ema.state_dict(), before)


def same_state_dict(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_integer_buffer_mismatch_raises_before_any_write_and_retry_averages_once(backend):
    model = net()
    ema = tx.ModelEMA(model, copy_buffers=True, tau=5)
    seed = SeedModelEMA(model, tau=5)
    model[1].num_batches_tracked = torch.zeros(3, dtype=torch.long)  # a shape the EMA's cannot take
    train(model)
    before = copy.deepcopy(ema.ema.state_dict())
    with pytest.raises(ValueError, match='num_batches_tracked'):
        ema.update(model)
    assert same_state_dict(ema.ema.state_dict(), before) and ema.updates == 0
    model[1].num_batches_tracked = torch.tensor(7)
    ema.update(model)
    seed.update(model)
    sd, want = ema.ema.state_dict(), seed.ema.state_dict()
    assert all(torch.equal(sd[k], want[k]) for k in sd if sd[k].dtype.is_floating_point)
    assert int(sd['1.num_batches_tracked']) == 7


@pytest.mark.parametrize('edt', [torch.float32, torch.float64])
def test_capturable_ramp_is_the_seed_ramp_bit_for_bit(backend, edt):
    """The device counter reads the seed's own decays (a table of the host ramp): bit-identical to
    capturable=False over a whole run with the default tau, including where torch.exp and math.exp differ."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1).to(edt)
    host, dev = tx.ModelEMA(model), tx.ModelEMA(model, capturable=True)
    decay, tau = host._ramp
    table = dev._table.values
    n = table.numel()
    assert dev._table.settled
    assert n > 30 * tau and table[-1].item() == decay
    xs = list(range(n))
    assert table.tolist() == [host.decay(x) for x in xs]  # every entry is the seed's value
    assert all(host.decay(x) == decay for x in range(n, n + 5000))  # and past the table the ramp is flat
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(300):
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g, dtype=edt))
            host.update(model)
            dev.update(model)
    assert same_state(host.ema, dev.ema) and dev.updates == 300
    dev.updates = n + 10  # past the table: the flat end
    host.updates = n + 10
    host.update(model)
    dev.update(model)
    assert same_state(host.ema, dev.ema)


def test_capturable_refuses_a_replaced_decay(backend):
    model = nn.Linear(3, 1)
    ema = tx.ModelEMA(model, capturable=True)
    ema.decay = lambda x: 0.5
    with pytest.raises(ValueError, match='replaced ema.decay'):
        ema.update(model)
    assert ema.updates == 0


def test_ramp_past_the_table_limit_uses_the_formula(monkeypatch, backend):
    """A schedule that has not settled within its table's limit keeps that many entries; past them the device
    formula serves (the device's exp may differ from the host's in the last bit)."""
    from torchutils_ext import _ema_schedule
    monkeypatch.setattr(_ema_schedule, 'RAMP_TABLE_LIMIT', 10)
    _ema_schedule.host_values.cache_clear()
    try:
        model = nn.Linear(3, 1)
        ema, host = tx.ModelEMA(model, capturable=True, tau=2000), tx.ModelEMA(model, tau=2000)
        assert ema._table.values.numel() == 10 and not ema._table.settled
        for updates in (0, 8, 9, 10, 500):
            ema.updates = host.updates = updates
            ema.update(model)
            host.update(model)
            d = _ema_schedule.device_decay(torch.full((1,), float(updates), dtype=torch.float64), ema._schedule,
                                           ema._table)
            want = 0.9999 * (1 - math.exp(-(updates + 1) / 2000))
            if updates + 1 < 10:
                assert d.item() == want and same_state(ema.ema, host.ema)
            else:
                assert math.isclose(d.item(), want, rel_tol=1e-15)
    finally:
        _ema_schedule.host_values.cache_clear()


@pytest.mark.skipif(not _ops.COMPILED, reason='ties the compiled watch to its Python twin')
def test_watch_rejects_bad_construction():
    model = net()
    ema = copy.deepcopy(model)
    layout = _ema_plan.Layout(ema, model)
    args = [layout.ema_ref, layout.model_ref, layout.every_step, layout.full, _ema_plan.GENERATION, len(layout.values)]
    for k, bad in ((0, ema), (2, tuple(layout.every_step)), (4, [0, 1]), (5, -1), (2, [(None, 'x', -1, 9, None)]),
                   (2, [(ema._modules, '0', -1, _ema_plan.EDGE, ema[0])])):
        with pytest.raises((TypeError, ValueError)):
            _ops._C.watch_new(*args[:k], bad, *args[k + 1:])
    watch = _ops._C.watch_new(*args)
    assert _ops._C.watch_read(watch, ema, model) is not None
    assert _ops._C.watch_read(watch, model, ema) is None  # the modules swapped: stale
    for call in ((object(), ema, model), (watch, ema)):
        with pytest.raises(TypeError):
            _ops._C.watch_read(*call)


@pytest.mark.skipif(not _ops.COMPILED, reason='the plan crossing is part of the compiled extension')
def test_plan_crossing_rejects_bad_input():
    model = net()
    ema = copy.deepcopy(model)
    before = copy.deepcopy(ema.state_dict())
    layout = _ema_plan.Layout(ema, model)
    watch = _ops._C.watch_new(layout.ema_ref, layout.model_ref, layout.every_step, layout.full, _ema_plan.GENERATION,
                              len(layout.values))
    groups = [(list(es), list(ms)) for es, ms in layout.groups]
    args = [watch, ema, model, groups, ([], []), 'yolov5']
    for k, bad in ((0, object()), (3, [(groups[0][0], groups[0][1][:-1])]), (3, [([999], [0])]), (4, ([1], [])),
                   (5, 'fast'), (3, [groups[0][0]])):
        with pytest.raises((TypeError, ValueError)):
            _ops._C.ema_plan_new(*args[:k], bad, *args[k + 1:])
    h = _ops._C.ema_plan_new(*args)
    for call in ((object(), ema, model, 0.5), (h, ema, model, 'x'), (h, ema, model, True), (h, ema, model)):
        with pytest.raises(TypeError):
            _ops._C.ema_plan_step(*call)
    assert _ops._C.ema_plan_step(h, model, ema, 0.5) is False  # other modules: stale, nothing written
    assert same_state_dict(ema.state_dict(), before)
    assert _ops._C.ema_plan_step(h, ema, model, 0.5) is True


def test_model_ema_pickles_and_keeps_its_ramp(backend):
    import io
    model = net()
    ema = tx.ModelEMA(model, tau=7, skip_nonfinite=True)
    ema.update(model)
    buf = io.BytesIO()
    torch.save(ema, buf)
    buf.seek(0)
    again = torch.load(buf, weights_only=False)
    assert [again.decay(x) for x in range(50)] == [0.9999 * (1 - math.exp(-x / 7)) for x in range(50)]
    seed = SeedModelEMA(model, tau=7)
    seed.ema = copy.deepcopy(again.ema)
    seed.updates = again.updates
    train(model)
    again.update(model)
    seed.update(model)
    assert same_state(again.ema, seed.ema) and again.updates == 2
