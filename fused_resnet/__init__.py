"""fused_resnet: ResNets whose conv + batch norm + ReLU + shortcut run as fused
PyTorch operators, drop-in for torchvision's models.

    model = fused_resnet.resnet50()              # or fused_resnet.convert(tv_model)
    fused_resnet.set_backend("cpu")              # auto | reference | cpu | cuda | triton
"""
import warnings as _warnings

import torch as _torch

try:
    from . import _C  # noqa: F401  (registers the compiled primitives: fused_resnet::bn_*)
except ImportError as _err:  # the reference backend still works without the build
    _C = None
    _warnings.warn(f"fused_resnet._C is not built ({_err}); only the 'reference' backend is "
                   "available. Build it with: pip install --no-build-isolation -e .",
                   stacklevel=2)

from . import ops, primitives  # noqa: E402
from .backends import (BackendUnavailableError, available_backends, get_backend,  # noqa: E402
                       set_backend, use_backend)
from .models import (BasicBlock, Bottleneck, ResNet, convert, resnet18, resnet34,  # noqa: E402
                     resnet50, resnet101, resnet152, resnext50_32x4d, resnext101_32x8d,
                     resnext101_64x4d, to_torchvision, wide_resnet50_2, wide_resnet101_2)
from .distributed import (SyncBatchNorm2d, convert_sync_batchnorm,  # noqa: E402
                          revert_sync_batchnorm)
from . import option_a  # noqa: E402  (fused_resnet::bn_add_relu_option_a)
from .cifar import (CifarResNet, cifar_resnet20, cifar_resnet32, cifar_resnet44,  # noqa: E402
                    cifar_resnet56, cifar_resnet110, cifar_resnet1202)

primitives.register_fake_kernels()

__version__ = "0.1.0"
__all__ = ["available_backends", "set_backend", "get_backend", "use_backend",
           "BackendUnavailableError", "convert", "to_torchvision", "ResNet", "BasicBlock",
           "Bottleneck", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
           "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2",
           "wide_resnet101_2", "ops", "primitives", "SyncBatchNorm2d", "convert_sync_batchnorm",
           "revert_sync_batchnorm", "option_a", "CifarResNet", "cifar_resnet20",
           "cifar_resnet32", "cifar_resnet44", "cifar_resnet56", "cifar_resnet110",
           "cifar_resnet1202"]
