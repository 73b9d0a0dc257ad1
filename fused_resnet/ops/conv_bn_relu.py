"""conv -> BN -> ReLU as one operator: the stem of every ResNet (relu(bn(conv(x))))."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..backends import registry
from ..backends.conventions import channel_vector, like
from .args import BNArgs, ConvArgs
from .checks import check_bn, check_conv, conv_out_shape, fake_conv, var_has_count
from .registration import custom_op, gradients, register_autograd


@custom_op("fused_resnet::conv_bn_relu", mutates_args=())
def conv_bn_relu(x: Tensor, weight: Tensor, gamma: Optional[Tensor], beta: Optional[Tensor],
                 running_mean: Optional[Tensor], running_var: Optional[Tensor],
                 stride: list[int], padding: list[int], dilation: list[int], groups: int,
                 training: bool, eps: float, relu: bool, sync_group: str = ""
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """relu(bn(conv(x, weight))) -> (out, z = conv output, batch mean, batch biased var).
    sync_group: sync BN's process-group key (fused_resnet/backends/collectives.py), "" = none."""
    check_conv(x, weight)
    conv = ConvArgs.of(stride, padding, dilation, groups)
    bn = BNArgs.of(gamma, beta, running_mean, running_var, training, eps, sync_group)
    check_bn(x, bn, conv_out_shape(x, weight, conv))
    return registry.resolve(x.device).conv_bn_relu_forward(x, weight, conv, bn, relu)


@conv_bn_relu.register_fake
def _(x, weight, gamma, beta, running_mean, running_var, stride, padding, dilation, groups,
      training, eps, relu, sync_group=""):
    check_conv(x, weight)
    z = fake_conv(x, weight, ConvArgs.of(stride, padding, dilation, groups))
    var = channel_vector(z, var_has_count(sync_group, training, running_mean))
    return torch.empty_like(z), z, channel_vector(z), var


def _conv_bn_relu_setup(ctx, inputs, output):
    (x, weight, gamma, beta, running_mean, running_var, stride, padding, dilation, groups,
     training, eps, relu, sync_group) = inputs
    out, z, mean, var = output
    ctx.mark_non_differentiable(mean, var)
    ctx.set_materialize_grads(False)   # no zero gradients made for the statistics
    ctx.save_for_backward(x, weight, gamma, beta, z, out, mean, var)
    ctx.conv = ConvArgs.of(stride, padding, dilation, groups)
    ctx.bn = BNArgs.of(None, None, running_mean, running_var, training, eps,
                        sync_group).without_tensors()
    ctx.relu = relu
    ctx.backend = registry.resolve(x.device)


def _conv_bn_relu_backward(ctx, grad_out, grad_z, _grad_mean, _grad_var):
    x, weight, gamma, beta, z, out, mean, var = ctx.saved_tensors
    bn = ctx.bn.with_affine(gamma, beta)
    grad_out = like(grad_out, z) if grad_out is not None else torch.zeros_like(out)
    need = ctx.needs_input_grad
    dx, dw, dgamma, dbeta = ctx.backend.conv_bn_relu_backward(
        grad_out, like(grad_z, z), x, weight, z, out, mean, var, ctx.conv, bn, ctx.relu,
        need[0], need[1])
    return gradients("fused_resnet::conv_bn_relu", x=dx, weight=dw, gamma=dgamma, beta=dbeta)


register_autograd(conv_bn_relu, _conv_bn_relu_backward, setup_context=_conv_bn_relu_setup)
