"""DDP helpers (seed: LOCAL_RANK, RANK, WORLD_SIZE, smart_DDP, torch_distributed_zero_first, is_parallel,
de_parallel), made to work on CPU with gloo and without a process group."""
import os
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from ._log import check_version

LOCAL_RANK = int(os.getenv('LOCAL_RANK', -1))  # https://pytorch.org/docs/stable/elastic/run.html
RANK = int(os.getenv('RANK', -1))
WORLD_SIZE = int(os.getenv('WORLD_SIZE', 1))


def _pg_ready():
    return dist.is_available() and dist.is_initialized()


def smart_DDP(model):
    """Wrap ``model`` in DistributedDataParallel (static_graph on torch>=1.11, as the seed).

    device_ids/output_device are passed only for a CUDA model on a non-gloo backend: gloo and CPU models
    reject them.
    """
    if not _pg_ready():
        raise RuntimeError('smart_DDP needs an initialised process group: call '
                           'torch.distributed.init_process_group(...) first')
    version = torch.__version__.split('+')[0]  # '1.12.0+cu113' is the broken release too
    if check_version(version, '1.12.0', pinned=True):
        raise RuntimeError('torch==1.12.0 torchvision==0.13.0 DDP training is not supported due to a known issue. '
                           'Please upgrade or downgrade torch to use DDP. '
                           'See https://github.com/ultralytics/yolov5/issues/8395')
    kwargs = {}
    p = next(iter(model.parameters()), None)
    if p is not None and p.device.type == 'cuda' and dist.get_backend() != 'gloo':
        idx = p.device.index if p.device.index is not None else max(LOCAL_RANK, 0)
        kwargs.update(device_ids=[idx], output_device=idx)
    if check_version(version, '1.11.0'):
        kwargs['static_graph'] = True
    return DDP(model, **kwargs)


def _barrier(local_rank):
    if dist.get_backend() == 'nccl':  # nccl needs to know which GPU this rank uses
        dist.barrier(device_ids=[local_rank])
    else:
        dist.barrier()


@contextmanager
def torch_distributed_zero_first(local_rank: int):
    """Let local rank 0 run the block first while the other ranks wait; a no-op without a process group."""
    active = _pg_ready()
    if active and local_rank not in (-1, 0):
        _barrier(local_rank)
    try:
        yield
    finally:  # release the waiting ranks even if rank 0 raised, so they fail instead of hanging
        if active and local_rank == 0:
            _barrier(0)


def is_parallel(model):
    """True if model is of type DP or DDP."""
    return type(model) in (nn.parallel.DataParallel, nn.parallel.DistributedDataParallel)


def de_parallel(model):
    """The wrapped module of a DP/DDP model, else the model itself."""
    return model.module if is_parallel(model) else model
