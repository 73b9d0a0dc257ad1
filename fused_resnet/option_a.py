"""Option-A shortcuts (ResNet paper, sec. 3.3 and the CIFAR-10 experiments) as one fused
operator:

    fused_resnet::bn_add_relu_option_a(z, gamma, beta, running_mean, running_var, x,
                                       stride, training, eps, relu) -> (out, mean, var)
    out = relu(bn(z) + pad_channels(x[:, :, ::stride, ::stride]))

The shortcut is parameter-free: the block input x [N, C_in, H_in, W_in] is subsampled
with `stride` (H = ceil(H_in / stride), what a 3x3 / padding-1 / stride-s convolution
gives, odd sizes included) and zero-padded from C_in to C channels (extra channels
appended after the first C_in). Batch norm behaves exactly as in `ops.bn_add_relu`:
batch statistics in training (or when no running statistics are given), running
statistics otherwise; the op returns the batch mean and biased variance and the caller
updates the running buffers with `ops.update_running_stats`.

Backward: grad_z, grad_gamma, grad_beta as for bn_add_relu, and grad_x = the transpose
of the shortcut (the ReLU-masked gradient at the subsampled positions of the first C_in
channels, zero everywhere else). Neither the padded shortcut nor its gradient is ever
materialised at the block's output size.

Implementations, through the backend (backends.py):
  reference   the plain-PyTorch primitives `bn_apply_option_a` and
              `bn_backward_apply_option_a` below (also the oracle of the compiled ones)
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
import torch.nn.functional as F
from torch import Tensor

from . import backends
from .ops import _check_activation, _check_bn, _like, _vec
from .params import BNArgs
from .primitives import acc_dtype, memory_format

__all__ = ["bn_add_relu_option_a", "option_a_shortcut", "option_a_shortcut_backward",
           "bn_apply_option_a", "bn_backward_apply_option_a", "has_compiled_kernel"]


# --- the shortcut itself, plain PyTorch ------------------------------------------------------

def _out_size(size: int, stride: int) -> int:
    return -(-size // stride)


def option_a_shortcut(x: Tensor, channels: int, stride: int) -> Tensor:
    """pad_channels(x[:, :, ::stride, ::stride]) with `channels` output channels."""
    return F.pad(x[:, :, ::stride, ::stride], (0, 0, 0, 0, 0, channels - x.shape[1]))


def option_a_shortcut_backward(grad: Tensor, shortcut_size: list, stride: int) -> Tensor:
    """The transpose of option_a_shortcut: grad [N, C, H, W] -> [N, C_in, H_in, W_in]."""
    fmt = memory_format(grad)
    out = torch.zeros(list(shortcut_size), dtype=grad.dtype, device=grad.device)
    out = out.contiguous(memory_format=fmt)
    out[:, :, ::stride, ::stride] = grad[:, :shortcut_size[1]]
    return out


# --- the two primitives in plain PyTorch (the reference backend, and the oracle) -------------

def _pc(v: Tensor) -> Tensor:
    return v.view(1, -1, 1, 1)


def bn_apply_option_a(x: Tensor, scale: Tensor, shift: Tensor, shortcut: Tensor, stride: int,
                      relu: bool) -> Tensor:
    """x*scale[c] + shift[c] + option_a_shortcut(shortcut), then ReLU; dtype and memory
    format of x, computed in the dtype of scale (the accumulation dtype)."""
    acc = scale.dtype
    out = x.to(acc) * _pc(scale) + _pc(shift)
    out = out + option_a_shortcut(shortcut.to(acc), x.shape[1], stride)
    if relu:
        out = out.clamp_min(0)
    return out.to(x.dtype).contiguous(memory_format=memory_format(x))


def bn_backward_apply_option_a(grad_out: Tensor, out: Optional[Tensor], x: Tensor,
                               mean: Tensor, a: Tensor, b: Tensor, d: Tensor,
                               shortcut_size: list, stride: int) -> tuple[Tensor, Tensor]:
    """(grad_x, grad_shortcut): grad_x = a*g + b*(x - mean) + d with g the ReLU-masked
    grad_out ((out <= 0) -> 0), grad_shortcut = option_a_shortcut_backward(g)."""
    acc = acc_dtype(x.dtype)
    fmt = memory_format(x)
    g = grad_out.to(acc)
    if out is not None:
        g = torch.where(out <= 0, torch.zeros((), dtype=acc, device=g.device), g)
    grad_x = (_pc(a) * g + _pc(b) * (x.to(acc) - _pc(mean)) + _pc(d)).to(x.dtype)
    grad_s = option_a_shortcut_backward(g.to(x.dtype).contiguous(memory_format=fmt),
                                        list(shortcut_size), stride)
    return grad_x.contiguous(memory_format=fmt), grad_s


# --- the compiled primitives -----------------------------------------------------------------

def has_compiled_kernel(device_type: str) -> bool:
    """Whether fused_resnet._C was built with the option-A kernels for this device type."""
    if not hasattr(torch.ops.fused_resnet, "bn_apply_option_a"):
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
        "fused_resnet::bn_apply_option_a", key)


def register_fake_kernels() -> None:
    """Fake (meta) kernels of the compiled primitives, so they trace under torch.compile
    and pass opcheck. Only when the extension defines them."""
    if not hasattr(torch.ops.fused_resnet, "bn_apply_option_a"):
        return
    reg = torch.library.register_fake

    @reg("fused_resnet::bn_apply_option_a")
    def _bn_apply_option_a_fake(x, scale, shift, shortcut, stride, relu):
        return torch.empty_like(x, memory_format=memory_format(x))

    @reg("fused_resnet::bn_backward_apply_option_a")
    def _bn_backward_apply_option_a_fake(grad_out, out, x, mean, a, b, d, shortcut_size,
                                         stride):
        fmt = memory_format(x)
        return (torch.empty_like(x, memory_format=fmt),
                torch.empty(list(shortcut_size), dtype=x.dtype, device=x.device,
                            memory_format=fmt))


# --- the block operator with autograd ---------------------------------------------------------

def _check_option_a(z: Tensor, x: Tensor, stride: int) -> None:
    _check_activation(z)
    _check_activation(x, "shortcut input")
    if stride < 1:
        raise ValueError(f"option-A shortcut stride must be >= 1, got {stride}")
    n, c, h, w = z.shape
    expected = [n, f"<= {c}", f"H_in with ceil(H_in / {stride}) = {h}",
                f"W_in with ceil(W_in / {stride}) = {w}"]
    if (x.shape[0] != n or x.shape[1] > c or _out_size(x.shape[2], stride) != h
            or _out_size(x.shape[3], stride) != w):
        raise RuntimeError(f"option-A shortcut input of shape {list(x.shape)} does not fit the "
                           f"main branch {list(z.shape)} with stride {stride}: expected "
                           f"[{', '.join(map(str, expected))}]")
    if x.dtype != z.dtype or x.device != z.device:
        raise RuntimeError(f"shortcut input must be a {z.dtype} tensor on {z.device}, "
                           f"got {x.dtype} on {x.device}")


@torch.library.custom_op("fused_resnet::bn_add_relu_option_a", mutates_args=())
def bn_add_relu_option_a(z: Tensor, gamma: Optional[Tensor], beta: Optional[Tensor],
                         running_mean: Optional[Tensor], running_var: Optional[Tensor],
                         x: Tensor, stride: int, training: bool, eps: float, relu: bool
                         ) -> tuple[Tensor, Tensor, Tensor]:
    """relu(bn(z) + pad_channels(x[:, :, ::stride, ::stride])) -> (out, batch mean of z,
    batch biased variance of z) (the running statistics in eval mode)."""
    _check_option_a(z, x, stride)
    bn = BNArgs.of(gamma, beta, running_mean, running_var, training, eps)
    _check_bn(z, bn)
    return backends.resolve(z.device).bn_add_relu_option_a_forward(z, bn, _like(x, z), stride,
                                                                   relu)


@bn_add_relu_option_a.register_fake
def _(z, gamma, beta, running_mean, running_var, x, stride, training, eps, relu):
    _check_option_a(z, x, stride)
    return torch.empty_like(z, memory_format=memory_format(z)), _vec(z), _vec(z)


def _setup(ctx, inputs, output):
    z, gamma, beta, running_mean, running_var, x, stride, training, eps, relu = inputs
    out, mean, var = output
    ctx.mark_non_differentiable(mean, var)
    # `out` is the next block's input and x this block's (kept by its first convolution):
    # saving out for the ReLU mask costs no memory, and of x only the shape is needed.
    ctx.save_for_backward(out, z, gamma, beta, mean, var)
    ctx.bn = BNArgs.of(None, None, running_mean, running_var, training, eps).without_tensors()
    ctx.x_size = list(x.shape)
    ctx.stride = stride
    ctx.relu = relu
    ctx.backend = backends.resolve(z.device)


def _backward(ctx, grad_out, _grad_mean, _grad_var):
    out, z, gamma, beta, mean, var = ctx.saved_tensors
    bn = ctx.bn.with_affine(gamma, beta)
    g = ctx.backend.bn_add_relu_option_a_backward(
        _like(grad_out, z), out if ctx.relu else None, z, mean, var, bn, ctx.x_size,
        ctx.stride)
    grad_x = g.grad_shortcut if ctx.needs_input_grad[5] else None
    return (g.grad_x, g.grad_gamma, g.grad_beta, None, None, grad_x, None, None, None, None)


bn_add_relu_option_a.register_autograd(_backward, setup_context=_setup)

register_fake_kernels()
