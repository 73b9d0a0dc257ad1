"""The `cpu` and `cuda` backends: the C++ (csrc/cpu) and CUDA (csrc/cuda) kernels of
fused_resnet._C, the same torch.ops dispatched by device."""
from __future__ import annotations

import functools

import torch

from .base import Backend

_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


@functools.lru_cache(maxsize=None)
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

    # The finish steps and option A: the compiled kernels when the extension has them
    # (an older build may not), else Backend's composite default.
    def bn_scale_shift(self, *args):
        if has_compiled_kernel("bn_scale_shift", self.device_type):
            return torch.ops.fused_resnet.bn_scale_shift(*args)
        return super().bn_scale_shift(*args)

    def bn_stats_affine(self, *args):
        if has_compiled_kernel("bn_stats_affine", self.device_type):
            return torch.ops.fused_resnet.bn_stats_affine(*args)
        return super().bn_stats_affine(*args)

    def bn_backward_coefficients(self, *args):
        if has_compiled_kernel("bn_backward_coefficients", self.device_type):
            return torch.ops.fused_resnet.bn_backward_coefficients(*args)
        return super().bn_backward_coefficients(*args)

    def bn_fold(self, weight, *args):
        # the kernel has no autograd: a gradient wanted through the folded weight (a frozen
        # BN under a trained convolution) takes the differentiable composite
        wants_grad = torch.is_grad_enabled() and any(
            isinstance(t, torch.Tensor) and t.requires_grad for t in (weight,) + args)
        if not wants_grad and has_compiled_kernel("bn_fold", self.device_type):
            return torch.ops.fused_resnet.bn_fold(weight, *args)
        return super().bn_fold(weight, *args)

    def bn_update_running_stats(self, *lists):
        if has_compiled_kernel("bn_update_running_stats", self.device_type):
            return torch.ops.fused_resnet.bn_update_running_stats(*lists)
        return super().bn_update_running_stats(*lists)

    def bn_apply_option_a(self, *args):
        if has_compiled_kernel("bn_apply_option_a", self.device_type):
            return torch.ops.fused_resnet.bn_apply_option_a(*args)
        return super().bn_apply_option_a(*args)

    def bn_backward_apply_option_a(self, *args):
        if has_compiled_kernel("bn_backward_apply_option_a", self.device_type):
            return torch.ops.fused_resnet.bn_backward_apply_option_a(*args)
        return super().bn_backward_apply_option_a(*args)
