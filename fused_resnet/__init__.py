"""fused_resnet: ResNets whose conv + batch norm + ReLU + shortcut run as fused
PyTorch operators, drop-in for torchvision's models.

    model = fused_resnet.resnet50()              # or fused_resnet.convert(tv_model)
    fused_resnet.set_backend("cpu")              # auto | reference | cpu | cuda | triton

The package, one role per folder: ops/ (the torch.library operators), backends/ (their
implementations and the registry), kernels/ (Triton), nn/ (module glue), models/ (the
zoo), testing/ (the oracle), tools/ (the command line). docs/DESIGN.md has the design.
"""
import warnings as _warnings

import torch as _torch  # noqa: F401  (loads libtorch, which fused_resnet._C links against)

try:
    from . import _C  # noqa: F401  (registers the compiled primitives: fused_resnet::bn_*)
except ImportError as _err:  # the reference backend still works without the build
    _C = None
    _warnings.warn(f"fused_resnet._C is not built ({_err}); only the 'reference' backend is "
                   "available. Build it with: pip install --no-build-isolation -e .",
                   stacklevel=2)

from . import ops  # noqa: E402  (registers the operators)
from .backends import (BackendUnavailableError, available_backends, get_backend,  # noqa: E402
                       set_backend, use_backend)
from .models import (BasicBlock, Bottleneck, CifarResNet, ResNet, cifar_resnet20,  # noqa: E402
                     cifar_resnet32, cifar_resnet44, cifar_resnet56, cifar_resnet110,
                     cifar_resnet1202, convert, get_model, get_model_weights, list_models,
                     resnet18, resnet34, resnet50, resnet101,
                     resnet152, resnext50_32x4d, resnext101_32x8d, resnext101_64x4d,
                     to_torchvision, wide_resnet50_2, wide_resnet101_2)
from .nn import SyncBatchNorm2d, convert_sync_batchnorm, revert_sync_batchnorm  # noqa: E402

__version__ = "0.1.0"
__all__ = ["available_backends", "set_backend", "get_backend", "use_backend",
           "BackendUnavailableError", "get_model", "get_model_weights", "list_models", "convert", "to_torchvision", "ResNet", "BasicBlock",
           "Bottleneck", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
           "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2",
           "wide_resnet101_2", "ops", "SyncBatchNorm2d", "convert_sync_batchnorm",
           "revert_sync_batchnorm", "CifarResNet", "cifar_resnet20", "cifar_resnet32",
           "cifar_resnet44", "cifar_resnet56", "cifar_resnet110", "cifar_resnet1202"]
