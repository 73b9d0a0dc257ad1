"""The `cpu` and `cuda` backends: the C++ (csrc/cpu) and CUDA (csrc/cuda) kernels of
fused_resnet._C, the same torch.ops dispatched by device."""
from __future__ import annotations

import torch

from .base import Backend

_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


def has_compiled_kernel(op: str, device_type: str) -> bool:
    """Whether fused_resnet._C was built with a kernel of `fused_resnet::op` for the
    device type ("cpu" or "cuda")."""
    key = _DISPATCH_KEYS.get(device_type)
    if key is None or not hasattr(torch.ops.fused_resnet, op):
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"fused_resnet::{op}", key)


class CompiledBackend(Backend):
    """The compiled primitives on one device type ("cpu" or "cuda")."""

    def __init__(self, device_type: str):
        self.name = device_type
        self.device_type = device_type

    def unavailable_reason(self, device):
        if device.type != self.device_type:
            return (f"the {self.name!r} backend runs on {self.device_type.upper()} tensors, "
                    f"got a tensor on {device}")
        if self.device_type == "cuda" and not torch.cuda.is_available():
            return "CUDA is not available"
        if not has_compiled_kernel("bn_stats", self.device_type):
            if self.device_type == "cpu":
                return ("the 'cpu' backend needs the compiled extension fused_resnet._C "
                        "(pip install -e .)")
            return ("the 'cuda' backend is not built: rebuild with a CUDA toolkit present "
                    "(FUSED_RESNET_CUDA=1 pip install --no-build-isolation -e .)")
        return None

    def bn_stats(self, x):
        return torch.ops.fused_resnet.bn_stats(x)

    def bn_apply(self, *args):
        return torch.ops.fused_resnet.bn_apply(*args)

    def bn_backward_reduce(self, *args):
        return torch.ops.fused_resnet.bn_backward_reduce(*args)

    def bn_backward_apply(self, *args):
        return torch.ops.fused_resnet.bn_backward_apply(*args)

    # option A: the compiled kernels when the extension has them, else Backend's default
    def bn_apply_option_a(self, *args):
        if has_compiled_kernel("bn_apply_option_a", self.device_type):
            return torch.ops.fused_resnet.bn_apply_option_a(*args)
        return super().bn_apply_option_a(*args)

    def bn_backward_apply_option_a(self, *args):
        if has_compiled_kernel("bn_backward_apply_option_a", self.device_type):
            return torch.ops.fused_resnet.bn_backward_apply_option_a(*args)
        return super().bn_backward_apply_option_a(*args)
