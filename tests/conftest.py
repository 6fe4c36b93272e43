import pytest
import torch

import torchutils_ext
from torchutils_ext import _ops

torch.set_num_threads(1)  # this 2-vCPU machine stalls under 2 busy threads

BACKENDS = ['torch', 'ext']
CUDA = torch.cuda.is_available()


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Run a test through the pure-torch path and through the compiled op."""
    if request.param == 'ext' and not _ops.COMPILED:
        pytest.skip(f'compiled ops not built: {_ops._LOAD_ERROR}')
    with torchutils_ext.use_backend(request.param):
        yield request.param


def same_layout_clone(t):
    """A copy with the same strides (a plain clone() of a strided view is compacted)."""
    base = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype)
    return base.copy_(t)


def ulps(a, b):
    """Largest distance in units in the last place between two float tensors of one dtype (0 = same bits;
    +0 and -0 count as equal)."""
    if a.numel() == 0:
        return 0
    ints = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
            torch.bfloat16: torch.int16}[a.dtype]
    lowest = torch.iinfo(ints).min

    def ordered(t):  # sign-magnitude bits -> integers in float order (-0 and +0 both 0)
        i = t.contiguous().view(ints).long()
        return torch.where(i < 0, lowest - i, i)
    return int((ordered(a) - ordered(b)).abs().max())


def snapshot(tensors):
    return [t.detach().clone() for t in tensors]


def assert_untouched(before, after):
    for b, a in zip(before, after):
        assert torch.equal(b, a.detach()), 'a tensor was modified by a call that raised'
