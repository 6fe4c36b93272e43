"""prune(): the model it leaves, compared with the seed's prune run on a twin, and global pruning checked layer by
layer against a ranking of every Conv2d weight at once."""
import pytest
import torch
import torch.nn as nn

import seed_api as seed
import torchutils_ext as tx


class MyConv(nn.Conv2d):  # a Conv2d subclass: the seed's isinstance test prunes it too
    pass


def twin_models():
    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), MyConv(8, 8, 1), nn.Conv1d(8, 8, 1),
                             nn.ConvTranspose2d(8, 4, 2), nn.Linear(4, 6))
    return make(), make()


def reparametrized(model):
    """Names and hooks torch.nn.utils.prune leaves while a pruning is not made permanent."""
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    left = [n for n in names if n.endswith(('_orig', '_mask'))]
    hooks = [m for m in model.modules() if m._forward_pre_hooks]
    return left, hooks


@pytest.mark.parametrize('amount', [0.3, 0.75, 5])
def test_prune_leaves_the_model_as_the_seed_does(backend, capsys, amount):
    ours, theirs = twin_models()
    names = [n for n, _ in ours.named_parameters()]
    tx.prune(ours, amount)
    out_ours = capsys.readouterr().out
    seed.prune(theirs, amount)
    out_seed = capsys.readouterr().out
    assert reparametrized(ours) == ([], [])
    # weight is a plain Parameter again, registered after bias as the seed leaves it
    assert sorted(n for n, _ in ours.named_parameters()) == sorted(names)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    assert all(type(p) is nn.Parameter for p in ours.parameters())
    sd_ours, sd_seed = ours.state_dict(), theirs.state_dict()
    assert list(sd_ours) == list(sd_seed)
    assert all(torch.equal(sd_ours[k], sd_seed[k]) for k in sd_ours)
    assert out_ours == out_seed and out_ours.startswith('Pruning model... ')
    # only Conv2d (and subclasses) lost weights: Conv1d, ConvTranspose2d, Linear keep theirs
    assert int((ours[0].weight == 0).sum()) > 0 and int((ours[2].weight == 0).sum()) > 0
    assert all(int((m.weight == 0).sum()) == 0 for m in (ours[3], ours[4], ours[5]))


def test_sparsity_after_prune_is_the_zero_fraction(backend, capsys):
    ours, theirs = twin_models()
    tx.prune(ours, 0.5)
    zeros = sum(int((p == 0).sum()) for p in ours.parameters())
    total = sum(p.numel() for p in ours.parameters())
    got = tx.sparsity(ours)
    assert torch.equal(got, seed.sparsity(ours)) and float(got) == pytest.approx(zeros / total, abs=1e-7)
    assert f' {float(got):.3g} global sparsity' in capsys.readouterr().out


def scaled_convs():
    """Conv2d layers whose weights differ in scale by 100x, so a global ranking prunes them very unevenly."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.Conv2d(16, 4, 1),
                          nn.Linear(4, 4))
    with torch.no_grad():
        for conv, scale in zip((model[0], model[2], model[3]), (0.01, 1.0, 0.1)):
            conv.weight.copy_(torch.randn_like(conv.weight) * scale)
    return model


def global_masks(weights, k):
    """Per layer: which weights are among the k smallest |w| of all layers together."""
    flat = torch.cat([w.detach().abs().flatten() for w in weights])
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    chosen[torch.topk(flat, k, largest=False).indices] = True
    return [c.view_as(w) for c, w in zip(chosen.split([w.numel() for w in weights]), weights)]


@pytest.mark.parametrize('amount', [0.4, 0.9, 300])
def test_global_prune_ranks_across_layers(backend, capsys, amount):
    model = scaled_convs()
    convs = [model[0], model[2], model[3]]
    weights = [c.weight.detach().clone() for c in convs]
    lin = model[4].weight.detach().clone()
    total = sum(w.numel() for w in weights)
    k = amount if isinstance(amount, int) else round(amount * total)
    masks = global_masks(weights, k)
    tx.prune(model, amount, global_unstructured=True)
    assert reparametrized(model) == ([], [])
    for conv, w, mask in zip(convs, weights, masks):
        assert torch.equal(conv.weight == 0, mask)  # exactly the globally smallest ones are zero
        assert torch.equal(conv.weight[~mask], w[~mask])  # the rest untouched
    assert torch.equal(model[4].weight, lin)
    counts = [int(m.sum()) for m in masks]
    per_layer = [round(amount * w.numel()) if isinstance(amount, float) else amount for w in weights]
    assert counts != per_layer  # the case tells global from per-layer pruning
    assert sum(counts) == k


def test_prune_without_conv2d_changes_nothing(backend, capsys):
    model = nn.Sequential(nn.Linear(3, 3), nn.Conv1d(3, 3, 1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for glob in (False, True):
        tx.prune(model, 0.5, global_unstructured=glob)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
