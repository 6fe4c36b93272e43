"""ModelEMA: parity with the seed over training steps, list revalidation, buffers, checkpoints, compile."""
import copy
import io

import pytest
import torch
import torch.nn as nn

from seed_oracle import SeedEMA

import torchutils_ext as tx


def small_net(device='cpu'):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.SiLU(), nn.Conv2d(8, 4, 1), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 5)).to(device)


def train_steps(model, emas, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    device = next(model.parameters()).device
    for _ in range(n):
        x = torch.randn(4, 3, 8, 8, generator=g).to(device)
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        for e in emas:
            e.update(model)


def states_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_bit_identical_to_seed_over_training(backend, device):
    model = small_net(device)
    ours, seed = tx.ModelEMA(model, tau=3), SeedEMA(model, tau=3)
    train_steps(model, [ours, seed], 12)
    assert ours.updates == seed.updates == 12
    assert states_equal(ours.ema, seed.ema)
    assert not any(p.requires_grad for p in ours.ema.parameters())
    assert ours.decay(5) == seed.decay(5)


def test_yolov5_model_parity(backend, device):
    from yolo_models import build_yolov5
    torch.manual_seed(0)
    model = build_yolov5('n').to(device)
    ours, seed = tx.ModelEMA(model, tau=2), SeedEMA(model, tau=2)
    for step in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.01)
        ours.update(model)
        seed.update(model)
    assert states_equal(ours.ema, seed.ema)


def test_lists_follow_model_changes(backend, device):
    model = small_net(device)
    ema = tx.ModelEMA(model)
    ema.update(model)
    plan = ema._plan
    ema.update(model)
    assert ema._plan is plan  # cached while nothing changed
    model.load_state_dict(small_net(device).state_dict())  # in-place copy: same tensors, plan stays valid
    ema.update(model)
    assert ema._plan is plan
    # buffers replaced (as .to()/.float() do for buffers): the plan is rebuilt and the EMA follows the new ones
    model[1].running_mean = torch.full_like(model[1].running_mean, 3.0)
    before = ema.ema[1].running_mean.clone()
    ema.update(model)
    assert ema._plan is not plan
    d = ema.decay(ema.updates)
    expected = before * d + (1 - d) * 3.0
    torch.testing.assert_close(ema.ema[1].running_mean, expected)


def test_half_model_under_fp32_ema(backend, device):
    model = small_net(device)
    ours, seed = tx.ModelEMA(model), SeedEMA(model)
    model.bfloat16()  # parameter data swapped in place, buffers replaced
    ours.update(model)
    d = ours.decay(1)
    for (k, v), (_, m) in zip(ours.ema.state_dict().items(), model.state_dict().items()):
        if v.dtype.is_floating_point:
            ref = seed.ema.state_dict()[k].double() * d + (1 - d) * m.double()
            torch.testing.assert_close(v.double(), ref, rtol=1e-6, atol=1e-7)


def test_copy_buffers_option_and_default(backend, device):
    model = small_net(device)
    default, timm_like = tx.ModelEMA(model), tx.ModelEMA(model, copy_buffers=True)
    model.train()
    model(torch.randn(2, 3, 8, 8, device=device))  # bumps num_batches_tracked
    default.update(model)
    timm_like.update(model)
    assert int(default.ema[1].num_batches_tracked) == 0  # seed leaves integer buffers
    assert int(timm_like.ema[1].num_batches_tracked) == 1


def test_tied_weights_updated_once(backend, device):
    lin = nn.Linear(4, 4)
    model = nn.Sequential(lin, nn.ReLU(), nn.Linear(4, 4)).to(device)
    model[2].weight = lin.weight  # tied
    ema = tx.ModelEMA(model, tau=1)
    with torch.no_grad():
        lin.weight.add_(1.0)
    before = ema.ema[0].weight.clone()
    ema.update(model)
    d = ema.decay(1)
    expected = before.double() * d + (1 - d) * lin.weight.double()
    torch.testing.assert_close(ema.ema[0].weight.double(), expected, rtol=1e-6, atol=1e-6)


def test_update_attr_and_de_parallel(backend, device):
    model = small_net(device)
    ema = tx.ModelEMA(nn.DataParallel(model))
    model.names, model.stride, model._private = ['a', 'b'], 32, 1
    ema.update_attr(model, include=['names', '_private'])
    assert ema.ema.names == ['a', 'b'] and not hasattr(ema.ema, '_private') and not hasattr(ema.ema, 'stride')
    ema.update(nn.DataParallel(model))  # de_parallel unwraps
    assert ema.updates == 1


def test_bad_arguments(device):
    model = small_net(device)
    with pytest.raises(ValueError):
        tx.ModelEMA(model, decay=1.5)
    with pytest.raises(ValueError):
        tx.ModelEMA(model, mode='foo')
    ema = tx.ModelEMA(model)
    other = nn.Sequential(nn.Linear(2, 2)).to(device)
    snap = [t.clone() for t in ema.ema.state_dict().values()]
    with pytest.raises(ValueError, match='structure'):
        ema.update(other)
    assert all(torch.equal(a, b) for a, b in zip(snap, ema.ema.state_dict().values()))
    assert ema.updates == 0


def test_checkpoint_resume_is_bit_exact(backend, device):
    """10 steps == 5 steps + save (seed layout) + load + smart_resume + 5 steps."""
    model_a = small_net(device)
    ema_a, seed_a = tx.ModelEMA(model_a), SeedEMA(model_a)
    train_steps(model_a, [ema_a, seed_a], 5, seed=1)
    train_steps(model_a, [ema_a, seed_a], 5, seed=2)
    assert states_equal(ema_a.ema, seed_a.ema)  # the uninterrupted run is the seed's, bit for bit

    model_b = small_net(device)
    ema_b = tx.ModelEMA(model_b)
    opt = torch.optim.SGD(model_b.parameters(), lr=0.1)
    train_steps(model_b, [ema_b], 5, seed=1)
    ckpt = {'epoch': 4, 'best_fitness': 0.5, 'model': copy.deepcopy(model_b).half(),
            'ema': copy.deepcopy(ema_b.ema).half(), 'updates': ema_b.updates, 'optimizer': opt.state_dict()}
    # the seed stores the EMA in half; keep full precision here to test bit-exact continuation
    ckpt['ema'] = copy.deepcopy(ema_b.ema)
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    model_c = small_net(device)
    model_c.load_state_dict(model_b.state_dict())
    ema_c = tx.ModelEMA(model_c)
    opt_c = torch.optim.SGD(model_c.parameters(), lr=0.1)
    best, start_epoch, epochs = tx.smart_resume(loaded, opt_c, ema_c, epochs=10)
    assert (best, start_epoch, ema_c.updates) == (0.5, 5, 5)
    train_steps(model_c, [ema_c], 5, seed=2)
    assert states_equal(ema_a.ema, ema_c.ema)


def test_seed_checkpoint_loads_and_continues(backend, device):
    """A checkpoint written by the seed's ModelEMA (fp16 EMA module) loads and continues."""
    model = small_net(device)
    seed = SeedEMA(model)
    train_steps(model, [seed], 3)
    buf = io.BytesIO()
    torch.save({'epoch': 0, 'best_fitness': 0.0, 'ema': copy.deepcopy(seed.ema).half(), 'updates': seed.updates,
                'optimizer': None}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    ours = tx.ModelEMA(model)
    tx.smart_resume(ckpt, None, ours, epochs=3)
    assert ours.updates == 3
    ref = {k: v.half().float() for k, v in seed.ema.state_dict().items()}
    for k, v in ours.ema.state_dict().items():
        assert torch.equal(v, ref[k].to(v.dtype)), k
    ours.update(model)
    assert ours.updates == 4


def test_torch_compile_training_step_matches_eager(backend, device):
    def run(compiled):
        model = small_net(device)
        ema, seed = tx.ModelEMA(model, tau=3), SeedEMA(model, tau=3)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)

        def step(x):
            loss = model(x).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            ema.update(model)
            return loss

        f = torch.compile(step, backend='eager') if compiled else step
        g = torch.Generator().manual_seed(0)
        for _ in range(3):
            f(torch.randn(4, 3, 8, 8, generator=g).to(device))
            seed.update(model)  # eager, outside the compiled step: the independent reference
        return ema, seed

    (a, seed_a), (b, seed_b) = run(False), run(True)
    assert a.updates == b.updates == 3
    assert states_equal(a.ema, seed_a.ema)
    for (k, x), y in zip(seed_b.ema.state_dict().items(), b.ema.state_dict().values()):
        torch.testing.assert_close(y, x, rtol=1e-6, atol=1e-6, msg=k)


def test_plan_is_rebuilt_when_tensors_change(backend, device):
    """Each plan validates once; a cast of the model (same Parameter objects, new storage) makes it stale."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).to(device)
    ema = tx.ModelEMA(model, decay=0.5, tau=1e-9)  # decay ~0.5 from the first update
    ema.update(model)
    plan = ema._plan
    ema.update(model)
    assert ema._plan is plan  # validated once, reused
    model.to(torch.bfloat16)  # same Parameter objects, new bf16 storage
    before = {k: v.clone() for k, v in ema.ema.state_dict().items()}
    ema.update(model)
    assert ema._plan is not plan
    w = model[0].weight.detach()
    ref = before['0.weight'] * 0.5 + 0.5 * w.float()
    torch.testing.assert_close(ema.ema[0].weight, ref, rtol=1e-6, atol=1e-7)


def test_replaced_submodule_is_tracked(device):
    """`model.block = NewBlock()` leaves the old block's dicts intact, so the slot check alone would keep
    averaging the old tensors; the module-registration generation makes the plan look again."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).to(device)
    ema = tx.ModelEMA(model, decay=0.5, tau=1e-9)
    ema.update(model)
    before = {k: v.clone() for k, v in ema.ema.state_dict().items()}
    model[1] = nn.Linear(4, 2).to(device)  # same shapes, new tensors
    ema.update(model)
    new_w = model[1].weight.detach()
    torch.testing.assert_close(ema.ema[1].weight, before['1.weight'] * 0.5 + 0.5 * new_w, rtol=1e-6, atol=1e-7)
    model[1] = nn.Linear(4, 3).to(device)  # a different structure: a clear error, not a silent stale EMA
    with pytest.raises(ValueError):
        ema.update(model)


def test_replaced_and_removed_slots_make_the_plan_stale(backend, device):
    """A replaced buffer or a removed parameter makes the plan stale (both watches agree), and the rebuilt plan
    follows; a removed entry the EMA still has is a structure error."""
    from test_ema_watch import both_watches
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).to(device)
    ema = tx.ModelEMA(model)
    ema.update(model)
    plan = ema._plan
    assert both_watches(plan, ema.ema, model)[1]
    model[1].running_mean = torch.zeros(4, device=device)  # a new buffer tensor in the same slot
    assert both_watches(plan, ema.ema, model)[1] is False and not plan.step(ema.ema, model, 0.5)
    assert both_watches(plan, ema.ema, model)[0] in (None, False)
    ema.update(model)
    assert ema._plan is not plan and both_watches(ema._plan, ema.ema, model)[1]
    plan = ema._plan
    del model[0]._parameters['bias']  # a removed slot: stale, and the rebuild names the mismatch
    assert not plan.step(ema.ema, model, 0.5)
    with pytest.raises(ValueError, match='structure'):
        ema.update(model)


def test_deepcopy_after_updates_is_independent(backend, device):
    """A ModelEMA that holds a built plan (a C++ handle on the compiled path) deep-copies: the copy drops the
    plan, rebuilds its own on the copied EMA, and the two then advance independently, each like the seed."""
    model = small_net(device)
    ours, seed = tx.ModelEMA(model, tau=3), SeedEMA(model, tau=3)
    train_steps(model, [ours, seed], 3)
    twin = copy.deepcopy(ours)
    assert twin._plan is None and states_equal(twin.ema, ours.ema)
    train_steps(model, [twin, seed], 2, seed=1)
    assert states_equal(twin.ema, seed.ema) and twin.updates == 5 and ours.updates == 3
    assert not states_equal(ours.ema, twin.ema)
