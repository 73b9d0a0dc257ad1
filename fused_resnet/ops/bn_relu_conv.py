"""BN -> ReLU -> conv as one operator, inside a block: conv(relu(bn(z))). Backward
recomputes the normalised activation instead of saving it."""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from ..backends import registry
from ..backends.conventions import channel_vector
from .args import BNArgs, ConvArgs
from .checks import check_bn, check_conv, fake_conv, var_has_count
from .registration import custom_op, gradients, register_autograd


@custom_op("fused_resnet::bn_relu_conv", mutates_args=())
def bn_relu_conv(z: Tensor, gamma: Optional[Tensor], beta: Optional[Tensor],
                 running_mean: Optional[Tensor], running_var: Optional[Tensor], weight: Tensor,
                 stride: list[int], padding: list[int], dilation: list[int], groups: int,
                 training: bool, eps: float, relu: bool, sync_group: str = ""
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """conv(relu(bn(z)), weight) -> (out, batch mean of z, batch biased var of z, scale,
    shift), with relu(bn(z)) = relu(z*scale + shift): the backward recomputes the
    activation from scale / shift instead of saving it.
    sync_group: sync BN's process-group key (fused_resnet/backends/collectives.py), "" = none."""
    check_conv(z, weight)
    bn = BNArgs.of(gamma, beta, running_mean, running_var, training, eps, sync_group)
    check_bn(z, bn)
    conv = ConvArgs.of(stride, padding, dilation, groups)
    return registry.resolve(z.device).bn_relu_conv_forward(z, weight, conv, bn, relu)


@bn_relu_conv.register_fake
def _(z, gamma, beta, running_mean, running_var, weight, stride, padding, dilation, groups,
      training, eps, relu, sync_group=""):
    check_conv(z, weight)
    out = fake_conv(z, weight, ConvArgs.of(stride, padding, dilation, groups))
    var = channel_vector(z, var_has_count(sync_group, training, running_mean))
    return out, channel_vector(z), var, channel_vector(z), channel_vector(z)


def _bn_relu_conv_setup(ctx, inputs, output):
    (z, gamma, beta, running_mean, running_var, weight, stride, padding, dilation, groups,
     training, eps, relu, sync_group) = inputs
    _out, mean, var, scale, shift = output
    ctx.mark_non_differentiable(mean, var, scale, shift)
    ctx.set_materialize_grads(False)   # no zero gradients made for the statistics
    ctx.save_for_backward(z, gamma, beta, weight, mean, var, scale, shift)
    ctx.conv = ConvArgs.of(stride, padding, dilation, groups)
    ctx.bn = BNArgs.of(None, None, running_mean, running_var, training, eps,
                        sync_group).without_tensors()
    ctx.relu = relu
    ctx.backend = registry.resolve(z.device)


def _bn_relu_conv_backward(ctx, grad_out, *_grad_stats):
    if grad_out is None:   # only the (non-differentiable) statistics were used
        return gradients("fused_resnet::bn_relu_conv")
    z, gamma, beta, weight, mean, var, scale, shift = ctx.saved_tensors
    bn = ctx.bn.with_affine(gamma, beta)
    need = ctx.needs_input_grad
    dz, dw, dgamma, dbeta = ctx.backend.bn_relu_conv_backward(
        grad_out, z, weight, mean, var, scale, shift, ctx.conv, bn, ctx.relu, need[0], need[5])
    return gradients("fused_resnet::bn_relu_conv", z=dz, gamma=dgamma, beta=dbeta, weight=dw)


register_autograd(bn_relu_conv, _bn_relu_conv_backward, setup_context=_bn_relu_conv_setup)
