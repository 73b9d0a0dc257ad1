"""Fake (meta) kernels of the compiled primitives (schemas in csrc/ops.cpp and
csrc/option_a.cpp), so that they trace under torch.compile and pass opcheck.
Registered only for the operators the extension defines."""
from __future__ import annotations

import torch
from torch import Tensor

from ..backends.conventions import acc_dtype, memory_format


def _vec(x: Tensor) -> Tensor:
    return x.new_empty(x.shape[1], dtype=acc_dtype(x.dtype))


def _bn_stats_fake(x):
    return _vec(x), _vec(x)


def _bn_apply_fake(x, scale, shift, residual, x_d, scale_d, shift_d, relu):
    return torch.empty_like(x, memory_format=memory_format(x))


def _bn_backward_reduce_fake(grad_out, out, x, mean, x_d, mean_d):
    empty = x.new_empty(0, dtype=acc_dtype(x.dtype))
    return _vec(x), _vec(x), (_vec(x) if x_d is not None else empty)


def _bn_backward_apply_fake(grad_out, out, x, mean, a, b, d, x_d, mean_d, a_d, b_d, d_d,
                            grad_residual):
    grad_x = torch.empty_like(x, memory_format=memory_format(x))
    if x_d is not None or grad_residual:
        return grad_x, torch.empty_like(x, memory_format=memory_format(x))
    return grad_x, x.new_empty(0)


def _bn_apply_option_a_fake(x, scale, shift, shortcut, stride, relu):
    return torch.empty_like(x, memory_format=memory_format(x))


def _bn_backward_apply_option_a_fake(grad_out, out, x, mean, a, b, d, shortcut_size, stride):
    fmt = memory_format(x)
    return (torch.empty_like(x, memory_format=fmt),
            torch.empty(list(shortcut_size), dtype=x.dtype, device=x.device, memory_format=fmt))


def _bn_scale_shift_fake(mean, var, gamma, beta, eps):
    return torch.empty_like(mean), torch.empty_like(mean)


def _bn_stats_affine_fake(x, gamma, beta, eps):
    return _vec(x), _vec(x), _vec(x), _vec(x)


def _bn_backward_coefficients_fake(grad_out, out, x, mean, var, gamma, eps, use_batch_stats,
                                   x_d, mean_d, var_d, gamma_d, eps_d):
    coef = x.new_empty((5, x.shape[1]), dtype=acc_dtype(x.dtype))
    return coef, (torch.empty_like(coef) if x_d is not None else coef.new_empty(0))


def _bn_fold_fake(weight, gamma, beta, running_mean, running_var, eps, dtype):
    return (torch.empty_like(weight, dtype=dtype or weight.dtype),
            torch.empty_like(running_mean))


def _bn_update_running_stats_fake(*lists):
    return None


FAKES = {"bn_stats": _bn_stats_fake, "bn_apply": _bn_apply_fake,
         "bn_backward_reduce": _bn_backward_reduce_fake,
         "bn_backward_apply": _bn_backward_apply_fake,
         "bn_apply_option_a": _bn_apply_option_a_fake,
         "bn_backward_apply_option_a": _bn_backward_apply_option_a_fake,
         "bn_scale_shift": _bn_scale_shift_fake, "bn_stats_affine": _bn_stats_affine_fake,
         "bn_backward_coefficients": _bn_backward_coefficients_fake,
         "bn_update_running_stats": _bn_update_running_stats_fake, "bn_fold": _bn_fold_fake}


def register_fake_kernels() -> None:
    """Register the fake kernel of every compiled primitive the extension defines."""
    for name, fake in FAKES.items():
        if hasattr(torch.ops.fused_resnet, name):
            torch.library.register_fake(f"fused_resnet::{name}", fake)
