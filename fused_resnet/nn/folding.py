"""Eval mode with running statistics: batch norm is affine and folds into the
convolution before it (scale into the weight, shift into a bias), which then runs as
conv_bias_act - for inference.

The folded weights are computed at every forward from the current parameters, buffers
and eps: nothing is cached, so changes made through `.data`, to `bn.eps`, or by
loading a state_dict are always seen, and a saved or copied model carries only its
own tensors."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .. import ops
from ..backends import registry
from ..ops.checks import check_eps
from .layers import conv_args


def use_folded(*bns: nn.BatchNorm2d) -> bool:
    """Eval mode with running statistics: BN is affine and folds into the conv - for
    inference. When gradients must reach gamma/beta, the unfolded eval-mode ops are
    used: through the folded bias d beta/d gamma would come out as a difference of
    large terms (sum g*z*invstd - mean*invstd*sum g), losing fp32 precision."""
    if torch.is_grad_enabled() and any(
            p is not None and p.requires_grad for bn in bns for p in (bn.weight, bn.bias)):
        return False
    return all(not bn.training and bn.running_mean is not None for bn in bns)


def folded(conv: nn.Conv2d, bn: nn.BatchNorm2d, dtype) -> tuple:
    """(weight, bias) of conv with bn folded in: the weight in `dtype` (None: conv's),
    the bias in the running statistics' dtype."""
    check_eps(bn.eps, batch_stats=False)
    backend = registry.resolve(conv.weight.device)   # one kernel on the compiled backends
    return backend.bn_fold(conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                           bn.eps, dtype if conv.weight.is_floating_point() else None)


def conv_bias_act(x: Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d,
                  residual: Optional[Tensor], relu: bool, dtype) -> Tensor:
    """relu?(conv(x) with bn folded in (+ residual))."""
    weight, bias = folded(conv, bn, dtype)
    return ops.conv_bias_act(x, weight, bias, residual, *conv_args(conv), relu)
