"""The fast module/parameter walks must yield exactly what model.modules() / model.parameters() yield."""
import torch
import torch.nn as nn

import torchutils_ext as tx
from torchutils_ext._walk import modules_once, parameters_once


def _tricky_model():
    shared = nn.Linear(3, 3)
    tied = nn.Linear(3, 3)
    head = nn.Linear(3, 3)
    head.weight = tied.weight  # tied parameter, reachable from two modules
    m = nn.Sequential(shared, nn.Sequential(shared, nn.ReLU()), tied, head, nn.ModuleDict({'a': nn.Conv2d(3, 2, 1)}))
    m.register_module('empty', None)  # a None child slot
    m[2].register_parameter('extra', None)  # a None parameter slot
    return m


def test_walks_equal_torch_order_and_identity():
    from yolo_models import build_yolov5
    for model in (_tricky_model(), build_yolov5('n')):
        assert [id(x) for x in modules_once(model)] == [id(x) for x in model.modules()]
        assert [id(x) for x in parameters_once(model)] == [id(x) for x in model.parameters()]


def test_walk_defers_to_an_overridden_walk():
    class Hidden(nn.Module):  # hides its second child from named_modules
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(2, 2), nn.Linear(2, 2)

        def named_modules(self, memo=None, prefix='', remove_duplicate=True):
            yield prefix, self
            yield from self.a.named_modules(memo, prefix + '.a', remove_duplicate)

    model = nn.Sequential(nn.Linear(2, 2), Hidden())
    assert len(list(model.modules())) == 4  # the Sequential, its Linear, Hidden, Hidden.a
    assert [id(x) for x in modules_once(model)] == [id(x) for x in model.modules()]
    assert [id(x) for x in parameters_once(model)] == [id(x) for x in model.parameters()]


def test_sparsity_counts_a_tied_parameter_once():
    model = _tricky_model()
    with torch.no_grad():
        model[3].weight.zero_()  # the tied weight: 9 zeros, counted once as model.parameters() does
    total = sum(p.numel() for p in model.parameters())
    zeros = sum(int((p == 0).sum()) for p in model.parameters())
    assert zeros >= 9
    assert torch.equal(tx.sparsity(model), torch.tensor(zeros) / total)  # the seed's int64 sum / int
