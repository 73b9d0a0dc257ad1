"""conv + bias (+ residual) (+ ReLU) as one operator: eval mode, with BN folded into
the convolution's weight and bias."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..backends import registry
from ..backends.conventions import like
from .args import ConvArgs
from .checks import check_conv, check_residual, conv_out_shape, fake_conv
from .registration import custom_op, gradients, register_autograd


@custom_op("fused_resnet::conv_bias_act", mutates_args=())
def conv_bias_act(x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor],
                  stride: list[int], padding: list[int], dilation: list[int], groups: int,
                  relu: bool) -> Tensor:
    """relu?(conv(x, weight) + bias + residual): a conv with its BN folded into weight/bias."""
    check_conv(x, weight)
    conv = ConvArgs.of(stride, padding, dilation, groups)
    check_residual(residual, x, conv_out_shape(x, weight, conv))
    return registry.resolve(x.device).conv_bias_act_forward(
        x, weight, bias, residual, conv, relu)


@conv_bias_act.register_fake
def _(x, weight, bias, residual, stride, padding, dilation, groups, relu):
    check_conv(x, weight)
    z = fake_conv(x, weight, ConvArgs.of(stride, padding, dilation, groups))
    check_residual(residual, x, list(z.shape))
    return torch.empty_like(z)


def _conv_bias_act_setup(ctx, inputs, output):
    x, weight, bias, residual, stride, padding, dilation, groups, relu = inputs
    ctx.save_for_backward(x, weight, output)
    ctx.conv = ConvArgs.of(stride, padding, dilation, groups)
    ctx.relu = relu
    ctx.backend = registry.resolve(x.device)


def _conv_bias_act_backward(ctx, grad_out):
    x, weight, out = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, dw, dbias, dres = ctx.backend.conv_bias_act_backward(
        like(grad_out, out), out, x, weight, ctx.conv, ctx.relu, need[0], need[1], need[2],
        need[3])
    return gradients("fused_resnet::conv_bias_act", x=dx, weight=dw, bias=dbias, residual=dres)


register_autograd(conv_bias_act, _conv_bias_act_backward, setup_context=_conv_bias_act_setup)
