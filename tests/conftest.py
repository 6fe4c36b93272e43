import pytest
import torch

import torchutils_ext
from torchutils_ext import _ops

torch.set_num_threads(1)  # this 2-vCPU machine stalls under 2 busy threads

BACKENDS = ['torch', 'ext']
CUDA = torch.cuda.is_available()
# The tests compare against float64 with fp32 tolerances: TF32 convolutions and matmuls (on by default for cuDNN
# on Ampere and later) round inputs to 10 bits and would fail them on any correct kernel.
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False
DEVICES = ['cpu', pytest.param('cuda', marks=pytest.mark.cuda)]


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Run a test through the pure-torch path and through the compiled op."""
    if request.param == 'ext' and not _ops.COMPILED:
        pytest.skip(f'compiled ops not built: {_ops._LOAD_ERROR}')
    with torchutils_ext.use_backend(request.param):
        yield request.param


@pytest.fixture(params=DEVICES)
def device(request):
    """Run a test on the CPU and on CUDA (as torchvision's cpu_and_cuda()): the CUDA case skips without a GPU, and
    with the compiled backend where the CUDA kernels were not built."""
    if request.param == 'cuda':
        if not CUDA:
            pytest.skip('needs a CUDA GPU')
        if 'backend' in request.fixturenames and request.getfixturevalue('backend') == 'ext' \
                and not _ops._has_kernel('ema_update_', 'cuda'):
            pytest.skip('CUDA kernels not built')
    return torch.device('cuda', torch.cuda.current_device()) if request.param == 'cuda' else torch.device('cpu')


def same_layout_clone(t):
    """A copy with the same strides (a plain clone() of a strided view is compacted)."""
    base = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
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
