"""Eval mode with running statistics: batch norm is affine, so it runs after the
convolution as one pass of scale / shift (+ residual) (+ ReLU), or folds into the
convolution before it (scale into the weight, shift into a bias) where the convolution
fuses its epilogue (conv_bias_act) or gradients must flow - for inference.

Scale / shift and folded weights are computed at every forward from the current
parameters, buffers and eps: nothing is cached, so changes made through `.data`, to `bn.eps`, or by
loading a state_dict are always seen, and a saved or copied model carries only its
own tensors."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .. import ops
from ..backends import registry
from ..backends.conventions import acc_dtype
from ..ops.checks import check_eps
from .layers import conv as plain_conv
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


def glue_backend(device: torch.device):
    """The backend of the primitives this module calls itself: the current one; under
    torch.compile the plain-PyTorch reference primitives, which dynamo traces and
    Inductor fuses (the backend choice is not traceable state)."""
    if torch.compiler.is_compiling():
        return registry.get("reference")
    return registry.resolve(device)


def folded(conv: nn.Conv2d, bn: nn.BatchNorm2d, dtype) -> tuple:
    """(weight, bias) of conv with bn folded in: the weight in `dtype` (None: conv's),
    the bias in the running statistics' dtype."""
    check_eps(bn.eps, batch_stats=False)
    backend = glue_backend(conv.weight.device)   # one kernel on the compiled backends
    return backend.bn_fold(conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                           bn.eps, dtype if conv.weight.is_floating_point() else None)


def _wants_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def conv_bias_act(x: Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d,
                  residual: Optional[Tensor], relu: bool, dtype) -> Tensor:
    """relu?(bn(conv(x)) (+ residual)) with bn's running statistics.

    Pure inference (no gradient wanted) on a backend whose convolutions have no fused
    epilogue: the convolution, then one pass of the backend's bn_apply with the residual
    and the ReLU (folding would read and write every weight at every forward, nothing
    being cached, and the bias, residual and ReLU would still be passes of their own).
    Otherwise BN folded into the convolution (conv_bias_act: a backend such as triton
    fuses bias + residual + ReLU into the convolution's epilogue; with gradients the fold
    is differentiable)."""
    backend = glue_backend(x.device)
    if backend.folds_eval_bn or _wants_grad(x, conv.weight, residual):
        weight, bias = folded(conv, bn, dtype)
        return ops.conv_bias_act(x, weight, bias, residual, *conv_args(conv), relu)
    check_eps(bn.eps, batch_stats=False)
    z = plain_conv(x, conv, dtype)
    acc = acc_dtype(z.dtype)
    scale, shift = backend.bn_scale_shift(bn.running_mean.to(acc), bn.running_var.to(acc),
                                          bn.weight, bn.bias, bn.eps)
    if residual is not None:
        residual = residual.to(z.dtype)
    return backend.bn_apply(z, scale, shift, residual, None, None, None, relu)
