"""BN -> + shortcut -> ReLU as one operator: a block's tail, with an identity shortcut
or a projection (the pre-BN output of the 1x1 shortcut conv and its BN)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..backends import registry
from ..backends.conventions import acc_dtype, channel_vector, like, memory_format
from .args import BNArgs
from .checks import check_activation, check_bn, check_like, var_has_count
from .registration import custom_op, gradients, register_autograd


@custom_op("fused_resnet::bn_add_relu", mutates_args=())
def bn_add_relu(z: Tensor, gamma: Optional[Tensor], beta: Optional[Tensor],
                running_mean: Optional[Tensor], running_var: Optional[Tensor],
                shortcut: Optional[Tensor], z_d: Optional[Tensor], gamma_d: Optional[Tensor],
                beta_d: Optional[Tensor], running_mean_d: Optional[Tensor],
                running_var_d: Optional[Tensor], training: bool, eps: float, eps_d: float,
                relu: bool, sync_group: str = ""
                ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """relu(bn(z) + shortcut) or relu(bn(z) + bn_d(z_d))
    -> (out, mean, var, mean_d, var_d); mean_d/var_d are empty without a projection.
    sync_group: sync BN's process-group key (fused_resnet/backends/collectives.py), "" = none."""
    check_activation(z)
    if shortcut is not None and z_d is not None:
        raise ValueError("bn_add_relu takes an identity shortcut or a projection (z_d), not both")
    bn = BNArgs.of(gamma, beta, running_mean, running_var, training, eps, sync_group)
    check_bn(z, bn)
    check_like(shortcut, z, "shortcut")
    check_like(z_d, z, "projection shortcut z_d")
    bn_d = None
    if z_d is not None:
        bn_d = BNArgs.of(gamma_d, beta_d, running_mean_d, running_var_d, training, eps_d,
                         sync_group)
        check_bn(z_d, bn_d)
    backend = registry.resolve(z.device)
    out, mean, var, mean_d, var_d = backend.bn_add_relu_forward(
        z, bn, like(shortcut, z), like(z_d, z), bn_d, relu)
    if mean_d is None:
        mean_d, var_d = mean.new_empty(0), mean.new_empty(0)
    return out, mean, var, mean_d, var_d


@bn_add_relu.register_fake
def _(z, gamma, beta, running_mean, running_var, shortcut, z_d, gamma_d, beta_d,
      running_mean_d, running_var_d, training, eps, eps_d, relu, sync_group=""):
    check_activation(z)
    check_like(shortcut, z, "shortcut")
    check_like(z_d, z, "projection shortcut z_d")
    empty = z.new_empty(0, dtype=acc_dtype(z.dtype))
    stats_d = (channel_vector(z),
               channel_vector(z, var_has_count(sync_group, training, running_mean_d))) \
        if z_d is not None else (empty, empty.clone())
    return (torch.empty_like(z, memory_format=memory_format(z)), channel_vector(z),
            channel_vector(z, var_has_count(sync_group, training, running_mean))) + stats_d


def _bn_add_relu_setup(ctx, inputs, output):
    (z, gamma, beta, running_mean, running_var, shortcut, z_d, gamma_d, beta_d,
     running_mean_d, running_var_d, training, eps, eps_d, relu, sync_group) = inputs
    out, mean, var, mean_d, var_d = output
    ctx.mark_non_differentiable(mean, var, mean_d, var_d)
    ctx.set_materialize_grads(False)   # no zero gradients made for the statistics
    # `out` is the next block's input, kept alive by it anyway: saving it for the ReLU
    # mask costs no memory.
    # Without ReLU (plain BN, e.g. sync BN on its own) out is not needed, and not saved:
    # callers may modify it in place (torchvision's `out += identity`).
    ctx.save_for_backward(out if relu else None, z, gamma, beta, mean, var, z_d, gamma_d,
                          beta_d, mean_d, var_d)
    ctx.bn = BNArgs.of(None, None, running_mean, running_var, training, eps,
                        sync_group).without_tensors()
    ctx.bn_d = BNArgs.of(None, None, running_mean_d, running_var_d, training, eps_d,
                          sync_group).without_tensors()
    ctx.has_shortcut = shortcut is not None
    ctx.relu = relu
    ctx.backend = registry.resolve(z.device)


def _bn_add_relu_backward(ctx, grad_out, *_grad_stats):
    if grad_out is None:   # only the (non-differentiable) statistics were used
        return gradients("fused_resnet::bn_add_relu")
    out, z, gamma, beta, mean, var, z_d, gamma_d, beta_d, mean_d, var_d = ctx.saved_tensors
    bn = ctx.bn.with_affine(gamma, beta)
    bn_d = ctx.bn_d.with_affine(gamma_d, beta_d) if z_d is not None else None
    g = ctx.backend.bn_add_relu_backward(
        like(grad_out, z), out, z, mean, var, bn, ctx.has_shortcut,
        z_d, mean_d if z_d is not None else None, var_d if z_d is not None else None, bn_d,
        ctx.relu)
    return gradients("fused_resnet::bn_add_relu", z=g.grad_x, gamma=g.grad_gamma,
                     beta=g.grad_beta, shortcut=g.grad_shortcut, z_d=g.grad_z_d,
                     gamma_d=g.grad_gamma_d, beta_d=g.grad_beta_d)


register_autograd(bn_add_relu, _bn_add_relu_backward, setup_context=_bn_add_relu_setup)
