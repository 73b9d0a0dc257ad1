"""Validation at the op boundary: the errors eager PyTorch gives (or clearer ones), and
the shapes the fake kernels need."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .args import BNArgs, ConvArgs


def check_activation(x: Tensor, what: str = "input") -> None:
    if x.dim() != 4:
        raise ValueError(f"expected 4D {what} (got {x.dim()}D {what})")
    if not x.is_floating_point():
        raise RuntimeError(f"expected a floating-point {what}, got {x.dtype}")


def check_like(t: Optional[Tensor], ref: Tensor, what: str) -> None:
    if t is None:
        return
    if t.shape != ref.shape:
        raise RuntimeError(f"{what} must have the shape of the main branch {list(ref.shape)}, "
                           f"got {list(t.shape)}")
    if t.dtype != ref.dtype or t.device != ref.device:
        raise RuntimeError(f"{what} must be a {ref.dtype} tensor on {ref.device}, "
                           f"got {t.dtype} on {t.device}")


def check_residual(residual: Optional[Tensor], x: Tensor, out_shape: list) -> None:
    if residual is None:
        return
    if list(residual.shape) != out_shape:
        raise RuntimeError(f"residual must have the convolution's output shape {out_shape}, "
                           f"got {list(residual.shape)}")
    if residual.dtype != x.dtype or residual.device != x.device:
        raise RuntimeError(f"residual must be a {x.dtype} tensor on {x.device}, "
                           f"got {residual.dtype} on {residual.device}")


def check_conv(x: Tensor, weight: Tensor) -> None:
    check_activation(x)
    if weight.dtype != x.dtype:
        raise RuntimeError(f"Input type ({x.dtype}) and weight type ({weight.dtype}) should be "
                           "the same")
    if weight.device != x.device:
        raise RuntimeError(f"Input ({x.device}) and weight ({weight.device}) must be on the "
                           "same device")


def conv_out_shape(x: Tensor, weight: Tensor, conv: ConvArgs) -> list:
    size = [x.shape[0], weight.shape[0]]
    for i in range(2):
        k = conv.dilation[i] * (weight.shape[2 + i] - 1) + 1
        size.append((x.shape[2 + i] + 2 * conv.padding[i] - k) // conv.stride[i] + 1)
    return size


def fake_conv(x: Tensor, weight: Tensor, conv: ConvArgs) -> Tensor:
    """The convolution's output as a fake kernel sees it (shape, dtype, layout)."""
    return torch.ops.aten.convolution(x, weight, None, *conv.args)


def check_bn(z: Tensor, bn: BNArgs, shape: Optional[list] = None) -> None:
    """Checks the BN arguments against the pre-BN tensor z (or its shape, not yet computed)."""
    shape = list(z.shape) if shape is None else shape
    c = shape[1]
    for name, t in (("weight", bn.gamma), ("bias", bn.beta), ("running_mean", bn.running_mean),
                    ("running_var", bn.running_var)):
        if t is None:
            continue
        if t.dim() != 1 or t.numel() != c:
            raise RuntimeError(f"batch norm {name} should contain {c} elements not {t.numel()}")
        if not t.is_floating_point() or t.device != z.device:
            raise RuntimeError(f"batch norm {name} must be a floating-point tensor on {z.device}, "
                               f"got {t.dtype} on {t.device}")
    if (bn.running_mean is None) != (bn.running_var is None):
        raise RuntimeError("running_mean and running_var must both be given or both be None")
    check_eps(bn.eps, bn.use_batch_stats)
    check_batch_size(shape, bn)


def check_eps(eps: float, batch_stats: bool) -> None:
    """Eager batch norm's checks: eps > 0 with batch statistics, eps >= 0 otherwise."""
    if batch_stats and not eps > 0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if not eps >= 0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")


def check_batch_size(shape: list, bn: BNArgs) -> None:
    """The error eager batch norm gives for one value per channel in training (none, an
    empty batch, is allowed, as in eager)."""
    values = 1
    for i, s in enumerate(shape):
        values *= s if i != 1 else 1
    if bn.use_batch_stats and values == 1 and not bn.sync:   # sync BN: the global count counts
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {list(shape)}")


def var_has_count(sync_group: str, training: bool, running_mean: Optional[Tensor]) -> bool:
    """Sync BN with batch statistics: var has C+1 elements (the last the global count)."""
    return BNArgs.of(None, None, running_mean, None, training, 0.0, sync_group).synced
