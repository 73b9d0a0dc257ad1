"""The fused block operators: torch.library custom ops in the `fused_resnet`
namespace, each with a fake (meta) kernel and an autograd formula.

    conv_bn_relu   conv -> BN -> ReLU (the stem)                  -> (out, z, mean, var)
    bn_relu_conv   BN -> ReLU -> conv (inside a block)            -> (out, mean, var)
    bn_add_relu    BN -> + shortcut -> ReLU (the block's tail)    -> (out, mean, var, mean_d, var_d)
                   shortcut: identity tensor, or the projection's pre-BN output z_d + its BN
    conv_bias_act  conv + bias (+ residual) (+ ReLU): eval mode with BN folded -> out
    update_running_stats  the running-statistics update of training-mode BN (mutating)

The ops are functional (PyTorch allows autograd formulas only on functional custom
ops), so they return the batch mean and biased variance, and the caller updates the
running buffers with `update_running_stats` - what `fused_resnet.nn` does.

Memory: what backward keeps is the pre-BN convolution outputs (z), the per-channel
statistics, and outputs that the network keeps alive anyway (a block's output is the
next block's input). BN -> ReLU -> conv is one operator so that the normalised
activation between them is never saved: backward recomputes it.

Sync BN (data-parallel training): conv_bn_relu, bn_relu_conv and bn_add_relu take an
optional trailing `sync_group` (a process-group key, "" = none); with it the batch
statistics and the backward's sums are merged over the ranks (one all-reduce each way)
and `var` carries the global count as an extra last element (fused_resnet/distributed.py).

Every op runs on the backend chosen by `fused_resnet.set_backend` (see backends.py);
the backend is fixed at forward time and reused by the backward.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import backends
from .params import BNArgs, ConvArgs, check_batch_size
from .primitives import acc_dtype, memory_format

custom_op = torch.library.custom_op


# --- validation at the op boundary: the errors eager PyTorch gives ------------------

def _check_activation(x: Tensor, what: str = "input") -> None:
    if x.dim() != 4:
        raise ValueError(f"expected 4D {what} (got {x.dim()}D {what})")
    if not x.is_floating_point():
        raise RuntimeError(f"expected a floating-point {what}, got {x.dtype}")


def _check_like(t: Optional[Tensor], ref: Tensor, what: str) -> None:
    if t is None:
        return
    if t.shape != ref.shape:
        raise RuntimeError(f"{what} must have the shape of the main branch {list(ref.shape)}, "
                           f"got {list(t.shape)}")
    if t.dtype != ref.dtype or t.device != ref.device:
        raise RuntimeError(f"{what} must be a {ref.dtype} tensor on {ref.device}, "
                           f"got {t.dtype} on {t.device}")


def _check_residual(residual: Optional[Tensor], x: Tensor, out_shape: list) -> None:
    if residual is None:
        return
    if list(residual.shape) != out_shape:
        raise RuntimeError(f"residual must have the convolution's output shape {out_shape}, "
                           f"got {list(residual.shape)}")
    if residual.dtype != x.dtype or residual.device != x.device:
        raise RuntimeError(f"residual must be a {x.dtype} tensor on {x.device}, "
                           f"got {residual.dtype} on {residual.device}")


def _check_conv(x: Tensor, weight: Tensor) -> None:
    _check_activation(x)
    if weight.dtype != x.dtype:
        raise RuntimeError(f"Input type ({x.dtype}) and weight type ({weight.dtype}) should be "
                           "the same")
    if weight.device != x.device:
        raise RuntimeError(f"Input ({x.device}) and weight ({weight.device}) must be on the "
                           "same device")


def _conv_out_shape(x: Tensor, weight: Tensor, conv: ConvArgs) -> list:
    size = [x.shape[0], weight.shape[0]]
    for i in range(2):
        k = conv.dilation[i] * (weight.shape[2 + i] - 1) + 1
        size.append((x.shape[2 + i] + 2 * conv.padding[i] - k) // conv.stride[i] + 1)
    return size


def _check_bn(z: Tensor, bn: BNArgs, shape: Optional[list] = None) -> None:
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
    check_batch_size(shape, bn)


def _like(t: Optional[Tensor], x: Tensor) -> Optional[Tensor]:
    """t in x's memory format: the kernels walk all operands in one layout."""
    return None if t is None else t.contiguous(memory_format=memory_format(x))


def _vec(x: Tensor, count: bool = False) -> Tensor:
    # count: sync BN's var output, [C] variance + the global count (fused_resnet/distributed.py)
    return x.new_empty(x.shape[1] + int(count), dtype=acc_dtype(x.dtype))


def _synced(sync_group: str, training: bool, running_mean: Optional[Tensor]) -> bool:
    """Sync BN with batch statistics: var has C+1 elements (the last the global count)."""
    return BNArgs.of(None, None, running_mean, None, training, 0.0, sync_group).synced


def _fake_conv(x: Tensor, weight: Tensor, conv: ConvArgs) -> Tensor:
    return torch.ops.aten.convolution(x, weight, None, *conv.args)


# --- conv -> BN -> ReLU ---------------------------------------------------------------

@custom_op("fused_resnet::conv_bn_relu", mutates_args=())
def conv_bn_relu(x: Tensor, weight: Tensor, gamma: Optional[Tensor], beta: Optional[Tensor],
                 running_mean: Optional[Tensor], running_var: Optional[Tensor],
                 stride: list[int], padding: list[int], dilation: list[int], groups: int,
                 training: bool, eps: float, relu: bool, sync_group: str = ""
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """relu(bn(conv(x, weight))) -> (out, z = conv output, batch mean, batch biased var).
    sync_group: sync BN's process-group key (fused_resnet/distributed.py), "" = none."""
    _check_conv(x, weight)
    conv = ConvArgs(tuple(stride), tuple(padding), tuple(dilation), groups)
    bn = BNArgs.of(gamma, beta, running_mean, running_var, training, eps, sync_group)
    _check_bn(x, bn, _conv_out_shape(x, weight, conv))
    return backends.resolve(x.device).conv_bn_relu_forward(x, weight, conv, bn, relu)


@conv_bn_relu.register_fake
def _(x, weight, gamma, beta, running_mean, running_var, stride, padding, dilation, groups,
      training, eps, relu, sync_group=""):
    _check_conv(x, weight)
    z = _fake_conv(x, weight, ConvArgs(tuple(stride), tuple(padding), tuple(dilation), groups))
    return torch.empty_like(z), z, _vec(z), _vec(z, _synced(sync_group, training, running_mean))


def _conv_bn_relu_setup(ctx, inputs, output):
    (x, weight, gamma, beta, running_mean, running_var, stride, padding, dilation, groups,
     training, eps, relu, sync_group) = inputs
    out, z, mean, var = output
    ctx.mark_non_differentiable(mean, var)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, weight, gamma, beta, z, out, mean, var)
    ctx.conv = ConvArgs(tuple(stride), tuple(padding), tuple(dilation), groups)
    ctx.bn = BNArgs.of(None, None, running_mean, running_var, training, eps,
                        sync_group).without_tensors()
    ctx.relu = relu
    ctx.backend = backends.resolve(x.device)


def _conv_bn_relu_backward(ctx, grad_out, grad_z, _grad_mean, _grad_var):
    x, weight, gamma, beta, z, out, mean, var = ctx.saved_tensors
    bn = ctx.bn.with_affine(gamma, beta)
    grad_out = _like(grad_out, z) if grad_out is not None else torch.zeros_like(out)
    need = ctx.needs_input_grad
    dx, dw, dgamma, dbeta = ctx.backend.conv_bn_relu_backward(
        grad_out, _like(grad_z, z), x, weight, z, out, mean, var, ctx.conv, bn, ctx.relu,
        need[0], need[1])
    return dx, dw, dgamma, dbeta, None, None, None, None, None, None, None, None, None, None


conv_bn_relu.register_autograd(_conv_bn_relu_backward, setup_context=_conv_bn_relu_setup)


# --- BN -> ReLU -> conv ---------------------------------------------------------------

@custom_op("fused_resnet::bn_relu_conv", mutates_args=())
def bn_relu_conv(z: Tensor, gamma: Optional[Tensor], beta: Optional[Tensor],
                 running_mean: Optional[Tensor], running_var: Optional[Tensor], weight: Tensor,
                 stride: list[int], padding: list[int], dilation: list[int], groups: int,
                 training: bool, eps: float, relu: bool, sync_group: str = ""
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """conv(relu(bn(z)), weight) -> (out, batch mean of z, batch biased var of z).
    sync_group: sync BN's process-group key (fused_resnet/distributed.py), "" = none."""
    _check_conv(z, weight)
    bn = BNArgs.of(gamma, beta, running_mean, running_var, training, eps, sync_group)
    _check_bn(z, bn)
    conv = ConvArgs(tuple(stride), tuple(padding), tuple(dilation), groups)
    return backends.resolve(z.device).bn_relu_conv_forward(z, weight, conv, bn, relu)


@bn_relu_conv.register_fake
def _(z, gamma, beta, running_mean, running_var, weight, stride, padding, dilation, groups,
      training, eps, relu, sync_group=""):
    _check_conv(z, weight)
    out = _fake_conv(z, weight, ConvArgs(tuple(stride), tuple(padding), tuple(dilation), groups))
    return out, _vec(z), _vec(z, _synced(sync_group, training, running_mean))


def _bn_relu_conv_setup(ctx, inputs, output):
    (z, gamma, beta, running_mean, running_var, weight, stride, padding, dilation, groups,
     training, eps, relu, sync_group) = inputs
    _out, mean, var = output
    ctx.mark_non_differentiable(mean, var)
    ctx.save_for_backward(z, gamma, beta, weight, mean, var)
    ctx.conv = ConvArgs(tuple(stride), tuple(padding), tuple(dilation), groups)
    ctx.bn = BNArgs.of(None, None, running_mean, running_var, training, eps,
                        sync_group).without_tensors()
    ctx.relu = relu
    ctx.backend = backends.resolve(z.device)


def _bn_relu_conv_backward(ctx, grad_out, _grad_mean, _grad_var):
    z, gamma, beta, weight, mean, var = ctx.saved_tensors
    bn = ctx.bn.with_affine(gamma, beta)
    need = ctx.needs_input_grad
    dz, dw, dgamma, dbeta = ctx.backend.bn_relu_conv_backward(
        grad_out, z, weight, mean, var, ctx.conv, bn, ctx.relu, need[0], need[5])
    return dz, dgamma, dbeta, None, None, dw, None, None, None, None, None, None, None, None


bn_relu_conv.register_autograd(_bn_relu_conv_backward, setup_context=_bn_relu_conv_setup)


# --- BN -> + shortcut -> ReLU -----------------------------------------------------------

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
    sync_group: sync BN's process-group key (fused_resnet/distributed.py), "" = none."""
    _check_activation(z)
    if shortcut is not None and z_d is not None:
        raise ValueError("bn_add_relu takes an identity shortcut or a projection (z_d), not both")
    bn = BNArgs.of(gamma, beta, running_mean, running_var, training, eps, sync_group)
    _check_bn(z, bn)
    _check_like(shortcut, z, "shortcut")
    _check_like(z_d, z, "projection shortcut z_d")
    bn_d = None
    if z_d is not None:
        bn_d = BNArgs.of(gamma_d, beta_d, running_mean_d, running_var_d, training, eps_d,
                         sync_group)
        _check_bn(z_d, bn_d)
    backend = backends.resolve(z.device)
    out, mean, var, mean_d, var_d = backend.bn_add_relu_forward(
        z, bn, _like(shortcut, z), _like(z_d, z), bn_d, relu)
    if mean_d is None:
        mean_d, var_d = mean.new_empty(0), mean.new_empty(0)
    return out, mean, var, mean_d, var_d


@bn_add_relu.register_fake
def _(z, gamma, beta, running_mean, running_var, shortcut, z_d, gamma_d, beta_d,
      running_mean_d, running_var_d, training, eps, eps_d, relu, sync_group=""):
    _check_activation(z)
    _check_like(shortcut, z, "shortcut")
    _check_like(z_d, z, "projection shortcut z_d")
    empty = z.new_empty(0, dtype=acc_dtype(z.dtype))
    stats_d = (_vec(z), _vec(z, _synced(sync_group, training, running_mean_d))) \
        if z_d is not None else (empty, empty.clone())
    return (torch.empty_like(z, memory_format=memory_format(z)), _vec(z),
            _vec(z, _synced(sync_group, training, running_mean))) + stats_d


def _bn_add_relu_setup(ctx, inputs, output):
    (z, gamma, beta, running_mean, running_var, shortcut, z_d, gamma_d, beta_d,
     running_mean_d, running_var_d, training, eps, eps_d, relu, sync_group) = inputs
    out, mean, var, mean_d, var_d = output
    ctx.mark_non_differentiable(mean, var, mean_d, var_d)
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
    ctx.backend = backends.resolve(z.device)


def _bn_add_relu_backward(ctx, grad_out, *_grad_stats):
    out, z, gamma, beta, mean, var, z_d, gamma_d, beta_d, mean_d, var_d = ctx.saved_tensors
    bn = ctx.bn.with_affine(gamma, beta)
    bn_d = ctx.bn_d.with_affine(gamma_d, beta_d) if z_d is not None else None
    g = ctx.backend.bn_add_relu_backward(
        _like(grad_out, z), out, z, mean, var, bn, ctx.has_shortcut,
        z_d, mean_d if z_d is not None else None, var_d if z_d is not None else None, bn_d,
        ctx.relu)
    d_shortcut = g.grad_shortcut if ctx.has_shortcut else None
    d_zd = g.grad_shortcut if z_d is not None else None
    return (g.grad_x, g.grad_gamma, g.grad_beta, None, None, d_shortcut, d_zd, g.grad_gamma2,
            g.grad_beta2, None, None, None, None, None, None, None)


bn_add_relu.register_autograd(_bn_add_relu_backward, setup_context=_bn_add_relu_setup)


# --- eval: conv + bias (+ residual) (+ ReLU) ------------------------------------------

@custom_op("fused_resnet::conv_bias_act", mutates_args=())
def conv_bias_act(x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor],
                  stride: list[int], padding: list[int], dilation: list[int], groups: int,
                  relu: bool) -> Tensor:
    """relu?(conv(x, weight) + bias + residual): a conv with its BN folded into weight/bias."""
    _check_conv(x, weight)
    conv = ConvArgs(tuple(stride), tuple(padding), tuple(dilation), groups)
    _check_residual(residual, x, _conv_out_shape(x, weight, conv))
    return backends.resolve(x.device).conv_bias_act_forward(
        x, weight, bias, residual, conv, relu)


@conv_bias_act.register_fake
def _(x, weight, bias, residual, stride, padding, dilation, groups, relu):
    _check_conv(x, weight)
    z = _fake_conv(x, weight, ConvArgs(tuple(stride), tuple(padding), tuple(dilation), groups))
    _check_residual(residual, x, list(z.shape))
    return torch.empty_like(z)


def _conv_bias_act_setup(ctx, inputs, output):
    x, weight, bias, residual, stride, padding, dilation, groups, relu = inputs
    ctx.save_for_backward(x, weight, output)
    ctx.conv = ConvArgs(tuple(stride), tuple(padding), tuple(dilation), groups)
    ctx.relu = relu
    ctx.backend = backends.resolve(x.device)


def _conv_bias_act_backward(ctx, grad_out):
    x, weight, out = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, dw, dbias, dres = ctx.backend.conv_bias_act_backward(
        _like(grad_out, out), out, x, weight, ctx.conv, ctx.relu, need[0], need[1], need[2],
        need[3])
    return dx, dw, dbias, dres, None, None, None, None, None


conv_bias_act.register_autograd(_conv_bias_act_backward, setup_context=_conv_bias_act_setup)


# --- running statistics ------------------------------------------------------------------

@custom_op("fused_resnet::update_running_stats",
           mutates_args=("running_mean", "running_var", "num_batches_tracked"))
def update_running_stats(running_mean: Optional[Tensor], running_var: Optional[Tensor],
                         num_batches_tracked: Optional[Tensor], mean: Tensor, var: Tensor,
                         count: int, momentum: Optional[float]) -> None:
    """What training-mode torch.nn.BatchNorm does to its buffers: count the batch and
    move the running mean / unbiased variance towards the batch's (momentum=None: the
    cumulative average). Sync BN: var has C+1 elements, the last the global count, which
    then replaces `count` (fused_resnet/distributed.py)."""
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    if running_mean is None:
        return
    if momentum is None:
        factor = 1.0 / float(num_batches_tracked) if num_batches_tracked is not None else 0.0
    else:
        factor = momentum
    if var.dim() == 1 and var.numel() == mean.numel() + 1:
        # sync BN (fused_resnet/distributed.py): var carries the global count as a tensor
        var, n = var[:-1], var[-1]
        unbiased = var * (n / (n - 1).clamp_min(1))
    else:
        unbiased = var * (count / max(count - 1, 1))
    running_mean.mul_(1 - factor).add_(mean.to(running_mean.dtype), alpha=factor)
    running_var.mul_(1 - factor).add_(unbiased.to(running_var.dtype), alpha=factor)


@update_running_stats.register_fake
def _(running_mean, running_var, num_batches_tracked, mean, var, count, momentum):
    return None
