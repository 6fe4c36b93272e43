"""The in-process YOLOv5 builder matches the real models' sizes (always runs, independent of --models)."""
import pytest
import torch

import yolo_models as Y


@pytest.mark.parametrize('size', list(Y.SIZES))
def test_param_count_within_5pct(size):
    n = Y.n_params(Y.build_yolov5(size))
    assert abs(n / Y.REAL_PARAMS[size] - 1) < 0.05, (size, n)


def test_structure_and_forward():
    m = Y.build_yolov5('s')
    # yolov5s: 57 Conv blocks -> 292 floating state_dict entries (the EMA's tensor count per step)
    assert sum(isinstance(b, Y.Conv) for b in m.modules()) == 57
    assert sum(v.dtype.is_floating_point for v in m.state_dict().values()) == 292
    blk = m.model[0]
    assert isinstance(blk.conv, torch.nn.Conv2d) and blk.conv.bias is None
    assert isinstance(blk.bn, torch.nn.BatchNorm2d) and callable(blk.forward_fuse)
    with torch.no_grad():
        out = m(torch.zeros(1, 3, 64, 64))
    assert [tuple(o.shape) for o in out] == [(1, 3, 8, 8, 85), (1, 3, 4, 4, 85), (1, 3, 2, 2, 85)]


def test_deterministic_and_nontrivial_bn():
    a, b = Y.build_yolov5('n'), Y.build_yolov5('n')
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    bn = a.model[0].bn
    assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))  # fusion must change weights
