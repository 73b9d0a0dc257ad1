"""Option-A shortcuts (ResNet paper, sec. 3.3 and the CIFAR-10 experiments) as one fused
operator:

    fused_resnet::bn_add_relu_option_a(z, gamma, beta, running_mean, running_var, x,
                                       stride, training, eps, relu) -> (out, mean, var)
    out = relu(bn(z) + pad_channels(x[:, :, ::stride, ::stride]))

The shortcut is parameter-free: the block input x [N, C_in, H_in, W_in] is subsampled
with `stride` (H = ceil(H_in / stride), what a 3x3 / padding-1 / stride-s convolution
gives, odd sizes included) and zero-padded from C_in to C channels (extra channels
appended after the first C_in). Batch norm behaves exactly as in `bn_add_relu`:
batch statistics in training (or when no running statistics are given), running
statistics otherwise; the op returns the batch mean and biased variance and the caller
updates the running buffers with `update_running_stats`.

Backward: grad_z, grad_gamma, grad_beta as for bn_add_relu, and grad_x = the transpose
of the shortcut (the ReLU-masked gradient at the subsampled positions of the first C_in
channels, zero everywhere else). Neither the padded shortcut nor its gradient is ever
materialised at the block's output size.

Implementations, through the backend (fused_resnet/backends):
  reference   the plain-PyTorch primitives `bn_apply_option_a` and
              `bn_backward_apply_option_a` (backends/primitives.py, also the oracle of
              the compiled ones)
  cpu, cuda   the compiled primitives torch.ops.fused_resnet.bn_apply_option_a /
              bn_backward_apply_option_a (csrc/option_a.cpp, csrc/cpu/option_a.cpp,
              csrc/cuda/option_a.cu) when the extension was built with them; otherwise
              (and on other backends) the four common primitives with the shortcut
              materialised (`Backend.bn_apply_option_a`).
The backward's reduction (sum g, sum g*(z - mean)) is the common `bn_backward_reduce`.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..backends import registry
from ..backends.conventions import channel_vector, like, memory_format
from ..backends.primitives import option_a_out_size
from .args import BNArgs
from .checks import check_activation, check_bn
from .registration import custom_op, gradients, register_autograd


def _check_option_a(z: Tensor, x: Tensor, stride: int) -> None:
    check_activation(z)
    check_activation(x, "shortcut input")
    if stride < 1:
        raise ValueError(f"option-A shortcut stride must be >= 1, got {stride}")
    n, c, h, w = z.shape
    expected = [n, f"<= {c}", f"H_in with ceil(H_in / {stride}) = {h}",
                f"W_in with ceil(W_in / {stride}) = {w}"]
    if (x.shape[0] != n or x.shape[1] > c or option_a_out_size(x.shape[2], stride) != h
            or option_a_out_size(x.shape[3], stride) != w):
        raise RuntimeError(f"option-A shortcut input of shape {list(x.shape)} does not fit the "
                           f"main branch {list(z.shape)} with stride {stride}: expected "
                           f"[{', '.join(map(str, expected))}]")
    if x.dtype != z.dtype or x.device != z.device:
        raise RuntimeError(f"shortcut input must be a {z.dtype} tensor on {z.device}, "
                           f"got {x.dtype} on {x.device}")


@custom_op("fused_resnet::bn_add_relu_option_a", mutates_args=())
def bn_add_relu_option_a(z: Tensor, gamma: Optional[Tensor], beta: Optional[Tensor],
                         running_mean: Optional[Tensor], running_var: Optional[Tensor],
                         x: Tensor, stride: int, training: bool, eps: float, relu: bool
                         ) -> tuple[Tensor, Tensor, Tensor]:
    """relu(bn(z) + pad_channels(x[:, :, ::stride, ::stride])) -> (out, batch mean of z,
    batch biased variance of z) (the running statistics in eval mode)."""
    _check_option_a(z, x, stride)
    bn = BNArgs.of(gamma, beta, running_mean, running_var, training, eps)
    check_bn(z, bn)
    return registry.resolve(z.device).bn_add_relu_option_a_forward(z, bn, like(x, z), stride,
                                                                   relu)


@bn_add_relu_option_a.register_fake
def _(z, gamma, beta, running_mean, running_var, x, stride, training, eps, relu):
    _check_option_a(z, x, stride)
    return torch.empty_like(z, memory_format=memory_format(z)), channel_vector(z), channel_vector(z)


def _setup(ctx, inputs, output):
    z, gamma, beta, running_mean, running_var, x, stride, training, eps, relu = inputs
    out, mean, var = output
    ctx.mark_non_differentiable(mean, var)
    ctx.set_materialize_grads(False)   # no zero gradients made for the statistics
    # `out` is the next block's input and x this block's (kept by its first convolution):
    # saving out for the ReLU mask costs no memory, and of x only the shape is needed.
    ctx.save_for_backward(out, z, gamma, beta, mean, var)
    ctx.bn = BNArgs.of(None, None, running_mean, running_var, training, eps).without_tensors()
    ctx.x_size = list(x.shape)
    ctx.stride = stride
    ctx.relu = relu
    ctx.backend = registry.resolve(z.device)


def _backward(ctx, grad_out, _grad_mean, _grad_var):
    if grad_out is None:   # only the (non-differentiable) statistics were used
        return gradients("fused_resnet::bn_add_relu_option_a")
    out, z, gamma, beta, mean, var = ctx.saved_tensors
    bn = ctx.bn.with_affine(gamma, beta)
    g = ctx.backend.bn_add_relu_option_a_backward(
        like(grad_out, z), out if ctx.relu else None, z, mean, var, bn, ctx.x_size,
        ctx.stride)
    return gradients("fused_resnet::bn_add_relu_option_a", z=g.grad_x, gamma=g.grad_gamma,
                     beta=g.grad_beta, x=g.grad_shortcut if ctx.needs_input_grad[5] else None)


register_autograd(bn_add_relu_option_a, _backward, setup_context=_setup)

