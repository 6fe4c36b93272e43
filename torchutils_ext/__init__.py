"""Drop-in replacement for YOLOv5's ``utils/torch_utils.py`` with compiled hot paths.

``from torchutils_ext import ModelEMA, fuse_conv_and_bn, select_device`` or
``sys.modules['utils.torch_utils'] = torchutils_ext`` both work.
"""
from ._ops import backend_info, get_backend, set_backend, use_backend
from .device import device_count, select_device, time_sync
from .distributed import (LOCAL_RANK, RANK, WORLD_SIZE, de_parallel, is_parallel, smart_DDP,
                          torch_distributed_zero_first)
from .ema import ModelEMA, ModelStructureError
from .fuse import fuse_conv_and_bn, fuse_model
from .profiling import model_info, profile
from .sparsity import prune, sparsity
from .training import (EarlyStopping, copy_attr, find_modules, initialize_weights, reshape_classifier_output,
                       scale_img, smart_amp_autocast, smart_hub_load, smart_inference_mode, smart_optimizer,
                       smart_resume, smartCrossEntropyLoss)

__version__ = '0.1.0'

__all__ = [
    # the seed's names
    'LOCAL_RANK', 'RANK', 'WORLD_SIZE', 'smart_DDP', 'torch_distributed_zero_first', 'device_count',
    'select_device', 'time_sync', 'profile', 'is_parallel', 'de_parallel', 'initialize_weights',
    'find_modules', 'sparsity', 'prune', 'fuse_conv_and_bn', 'model_info', 'scale_img', 'copy_attr',
    'smart_optimizer', 'smart_resume', 'EarlyStopping', 'ModelEMA',
    # names real YOLOv5 checkouts import beyond the seed text
    'smart_inference_mode', 'smart_amp_autocast', 'smartCrossEntropyLoss', 'reshape_classifier_output',
    'smart_hub_load',
    # ours
    'fuse_model', 'ModelStructureError', 'backend_info', 'get_backend', 'set_backend', 'use_backend',
]
