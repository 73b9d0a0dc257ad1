"""Eval mode with running statistics: batch norm is affine and folds into the
convolution before it (scale into the weight, shift into a bias), which then runs as
conv_bias_act - for inference."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .. import ops
from .autocast import cast
from .layers import conv_args

FOLD_CACHE = "_fused_resnet_folded"  # attribute of an nn.Conv2d: (key, weight, bias)


def use_folded(*bns: nn.BatchNorm2d) -> bool:
    """Eval mode with running statistics: BN is affine and folds into the conv - for
    inference. When gradients must reach gamma/beta, the unfolded eval-mode ops are
    used: through the folded bias d beta/d gamma would come out as a difference of
    large terms (sum g*z*invstd - mean*invstd*sum g), losing fp32 precision."""
    if torch.is_grad_enabled() and any(
            p is not None and p.requires_grad for bn in bns for p in (bn.weight, bn.bias)):
        return False
    return all(not bn.training and bn.running_mean is not None for bn in bns)


def _folded_uncached(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple:
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    bias = -bn.running_mean * scale
    if bn.bias is not None:
        bias = bias + bn.bias
    weight = conv.weight * scale.to(conv.weight.dtype).reshape(-1, 1, 1, 1)
    return weight, bias


def folded(conv: nn.Conv2d, bn: nn.BatchNorm2d, dtype) -> tuple:
    """(weight, bias) of conv with bn folded in, cached per version of the tensors it
    is made from (so once per optimizer step), unless gradients must flow through it."""
    tensors = [t for t in (conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var)
               if t is not None]
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    if needs_grad or torch.compiler.is_compiling():
        weight, bias = _folded_uncached(conv, bn)
        return cast(weight, dtype), bias
    key = (dtype,) + tuple((t.data_ptr(), t._version, t.device, t.dtype) for t in tensors)
    hit = conv.__dict__.get(FOLD_CACHE)
    if hit is None or hit[0] != key:
        with torch.no_grad():
            weight, bias = _folded_uncached(conv, bn)
            hit = (key, cast(weight, dtype), bias)
        conv.__dict__[FOLD_CACHE] = hit
    return hit[1], hit[2]


def clear_fold_cache(module: nn.Module) -> None:
    """Drop the folded weights cached on `module` (one conv)."""
    module.__dict__.pop(FOLD_CACHE, None)


def conv_bias_act(x: Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d,
                  residual: Optional[Tensor], relu: bool, dtype) -> Tensor:
    """relu?(conv(x) with bn folded in (+ residual))."""
    weight, bias = folded(conv, bn, dtype)
    return ops.conv_bias_act(x, weight, bias, residual, *conv_args(conv), relu)
