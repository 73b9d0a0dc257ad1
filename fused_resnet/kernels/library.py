"""The backward kernels as torch.library custom operators.

The block operators' backward formulas are traced by AOTAutograd under torch.compile
(and by opcheck) with fake tensors, so the Triton calls they make are custom operators
with fake kernels. (The forward calls need not be: they run inside the block operators,
which are opaque.)
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import conv, relu_mask

custom_op = torch.library.custom_op


def _bn_grad(bn_z, bn_out, bn_mean, bn_a, bn_b, bn_d):
    if bn_z is None:
        return None
    return conv.BNGradPrologue(z=bn_z, out=bn_out, mean=bn_mean, a=bn_a, b=bn_b, d=bn_d)


@custom_op("fused_resnet::triton_conv_input_grad", mutates_args=())
def conv_input_grad(grad_out: Tensor, weight: Tensor, input_shape: list[int],
                    stride: list[int], padding: list[int], dilation: list[int], groups: int,
                    bn_z: Optional[Tensor], bn_out: Optional[Tensor],
                    bn_mean: Optional[Tensor], bn_a: Optional[Tensor],
                    bn_b: Optional[Tensor], bn_d: Optional[Tensor]) -> Tensor:
    """conv2d_input_grad (channels_last, grad_out's dtype), with the BN(+ReLU) backward
    folded into its grad_out loads when bn_z is given (BNGradPrologue's fields)."""
    return conv.conv2d_input_grad(
        grad_out, weight, list(input_shape), list(stride), list(padding), list(dilation), groups,
        bn_grad=_bn_grad(bn_z, bn_out, bn_mean, bn_a, bn_b, bn_d))


@conv_input_grad.register_fake
def _(grad_out, weight, input_shape, stride, padding, dilation, groups, bn_z, bn_out, bn_mean,
      bn_a, bn_b, bn_d):
    return grad_out.new_empty(list(input_shape)).contiguous(memory_format=torch.channels_last)


@custom_op("fused_resnet::triton_conv_weight_grad", mutates_args=())
def conv_weight_grad(x: Tensor, grad_out: Tensor, weight: Tensor, stride: list[int],
                     padding: list[int], dilation: list[int], groups: int,
                     in_scale: Optional[Tensor], in_shift: Optional[Tensor], in_relu: bool,
                     bn_z: Optional[Tensor], bn_out: Optional[Tensor],
                     bn_mean: Optional[Tensor], bn_a: Optional[Tensor],
                     bn_b: Optional[Tensor], bn_d: Optional[Tensor]) -> Tensor:
    """conv2d_weight_grad (fp32 accumulation) returned in weight's dtype and strides, with
    the input prologue relu?(x*in_scale + in_shift) and the folded BN backward."""
    gw = conv.conv2d_weight_grad(
        x, grad_out, list(weight.shape), list(stride), list(padding), list(dilation), groups,
        in_scale=in_scale, in_shift=in_shift, in_relu=in_relu,
        bn_grad=_bn_grad(bn_z, bn_out, bn_mean, bn_a, bn_b, bn_d))
    return torch.empty_like(weight, memory_format=torch.preserve_format).copy_(gw)


@conv_weight_grad.register_fake
def _(x, grad_out, weight, stride, padding, dilation, groups, in_scale, in_shift, in_relu, bn_z,
      bn_out, bn_mean, bn_a, bn_b, bn_d):
    return torch.empty_like(weight, memory_format=torch.preserve_format)


@custom_op("fused_resnet::triton_relu_mask_", mutates_args=("dy",))
def relu_mask_op(dy: Tensor, z: Tensor, scale: Tensor, shift: Tensor) -> None:
    """dy = 0 in place where relu(z*scale + shift) (rounded to z's dtype) is 0."""
    relu_mask.relu_mask_(dy, z, scale, shift)


@relu_mask_op.register_fake
def _(dy, z, scale, shift):
    return None
