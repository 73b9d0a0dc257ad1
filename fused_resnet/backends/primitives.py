"""The kernel-level primitives in plain PyTorch: what the `reference` backend runs, and
the oracle the compiled kernels are tested against.

Every backend implements the same memory-bound primitives (schemas and math in
csrc/ops.cpp): the four passes over a tensor (bn_stats, bn_apply, bn_backward_reduce,
bn_backward_apply), the same passes with their per-channel finish steps
(bn_stats_affine, bn_backward_coefficients), the per-channel steps alone
(bn_scale_shift, bn_update_running_stats, bn_fold), and the two option-A shortcut primitives
(csrc/option_a.cpp). Per-channel vectors are in the accumulation dtype: float64 for
float64 input, float32 otherwise.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .conventions import acc_dtype, memory_format, per_channel, reduce_dims


def bn_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance (two-pass, in acc dtype)."""
    xa = x.to(acc_dtype(x.dtype))
    dims = reduce_dims(x)
    mean = xa.mean(dims)
    var = (xa - per_channel(mean, x.dim())).square().mean(dims)
    return mean, var


def bn_scale_shift(mean: Tensor, var: Tensor, gamma: Optional[Tensor], beta: Optional[Tensor],
                   eps: float) -> tuple[Tensor, Tensor]:
    """scale, shift with x*scale + shift == gamma*(x - mean)/sqrt(var + eps) + beta."""
    scale = torch.rsqrt(var + eps)
    if gamma is not None:
        scale = scale * gamma.to(scale.dtype)
    if beta is not None:
        shift = torch.addcmul(beta.to(scale.dtype), mean, scale, value=-1)
    else:
        shift = mean * -scale
    return scale, shift


def bn_stats_affine(x: Tensor, gamma: Optional[Tensor], beta: Optional[Tensor], eps: float
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """bn_stats with its finish step: mean, biased var, and the scale / shift they give."""
    mean, var = bn_stats(x)
    return (mean, var) + bn_scale_shift(mean, var, gamma, beta, eps)


def bn_fold(weight: Tensor, gamma: Optional[Tensor], beta: Optional[Tensor],
            running_mean: Tensor, running_var: Tensor, eps: float,
            dtype: Optional[torch.dtype]) -> tuple[Tensor, Tensor]:
    """Eval-mode BN folded into the convolution before it: (weight * scale[o] in `dtype`
    (None: weight's), bias = shift), scale / shift of the running statistics in their
    dtype. Differentiable (a frozen BN under a trained convolution)."""
    scale, shift = bn_scale_shift(running_mean, running_var, gamma, beta, eps)
    folded = weight * scale.to(weight.dtype).reshape(-1, *[1] * (weight.dim() - 1))
    return (folded if dtype is None or folded.dtype == dtype else folded.to(dtype)), shift


def bn_apply(x: Tensor, scale: Tensor, shift: Tensor, residual: Optional[Tensor],
             x_d: Optional[Tensor], scale_d: Optional[Tensor], shift_d: Optional[Tensor],
             relu: bool) -> Tensor:
    nd = x.dim()
    out = x.to(scale.dtype) * per_channel(scale, nd) + per_channel(shift, nd)
    if residual is not None:
        out = out + residual.to(scale.dtype)
    if x_d is not None:
        out = out + x_d.to(scale.dtype) * per_channel(scale_d, nd) + per_channel(shift_d, nd)
    if relu:
        out = out.clamp_min(0)
    return out.to(x.dtype).contiguous(memory_format=memory_format(x))


def masked_grad(grad_out: Tensor, out: Optional[Tensor], acc: torch.dtype) -> Tensor:
    """grad_out in acc, zero where the ReLU output is <= 0 (when out is given)."""
    g = grad_out.to(acc)
    if out is not None:
        # (out <= 0) -> 0, not (out > 0) -> g: a NaN output passes its gradient, as in eager.
        g = torch.where(out <= 0, torch.zeros((), dtype=acc, device=g.device), g)
    return g


def bn_backward_reduce(grad_out: Tensor, out: Optional[Tensor], x: Tensor, mean: Tensor,
                       x_d: Optional[Tensor], mean_d: Optional[Tensor]
                       ) -> tuple[Tensor, Tensor, Tensor]:
    acc = acc_dtype(x.dtype)
    nd = x.dim()
    dims = reduce_dims(x)
    g = masked_grad(grad_out, out, acc)
    sum_g = g.sum(dims)
    sum_g_xmu = (g * (x.to(acc) - per_channel(mean, nd))).sum(dims)
    if x_d is not None:
        sum_g_xmu_d = (g * (x_d.to(acc) - per_channel(mean_d, nd))).sum(dims)
    else:
        sum_g_xmu_d = sum_g.new_empty(0)
    return sum_g, sum_g_xmu, sum_g_xmu_d


def grad_coefficients(sum_g: Tensor, sum_g_xmu: Tensor, var: Tensor, gamma: Optional[Tensor],
                      eps: float, count, use_batch_stats: bool) -> Tensor:
    """[5, C]: a, b, d of grad_x = a*g + b*(x - mean) + d, then d gamma, d beta.

    With batch statistics (n values per channel):
        grad_x = gamma*invstd * (g - sum_g/n - (x - mean)*invstd^2*sum_g_xmu/n)
    with running statistics the mean and variance are constants: grad_x = gamma*invstd*g.
    d gamma = sum_g_xmu*invstd and d beta = sum_g (rows 3 and 4, whether or not BN is
    affine)."""
    invstd = torch.rsqrt(var + eps)
    a = invstd * gamma.to(invstd.dtype) if gamma is not None else invstd
    if use_batch_stats:
        b = -a * invstd * invstd * sum_g_xmu / count
        d = -a * sum_g / count
    else:
        b = d = torch.zeros_like(a)
    return torch.stack([a, b, d, sum_g_xmu * invstd, sum_g])


def bn_backward_coefficients(grad_out: Tensor, out: Optional[Tensor], x: Tensor, mean: Tensor,
                             var: Tensor, gamma: Optional[Tensor], eps: float,
                             use_batch_stats: bool, x_d: Optional[Tensor],
                             mean_d: Optional[Tensor], var_d: Optional[Tensor],
                             gamma_d: Optional[Tensor], eps_d: float) -> tuple[Tensor, Tensor]:
    """bn_backward_reduce with its finish step: the [5, C] coefficients of x's BN (and of
    the projection's, else an empty tensor): grad_coefficients of the sums."""
    sum_g, sum_g_xmu, sum_g_xmu_d = bn_backward_reduce(grad_out, out, x, mean, x_d, mean_d)
    count = x.numel() // x.shape[1] if x.shape[1] else 0
    coef = grad_coefficients(sum_g, sum_g_xmu, var, gamma, eps, count, use_batch_stats)
    if x_d is None:
        return coef, coef.new_empty(0)
    return coef, grad_coefficients(sum_g, sum_g_xmu_d, var_d, gamma_d, eps_d, count,
                                   use_batch_stats)


def bn_update_running_stats(running_mean: Tensor, running_var: Tensor,
                            num_batches_tracked: Optional[Tensor], mean: Tensor, var: Tensor,
                            count: int, momentum: float, cumulative: bool) -> None:
    """In place, what training-mode torch.nn.BatchNorm does to its buffers: count the
    batch, then move the running mean / unbiased variance towards the batch's by momentum,
    or by 1/num_batches_tracked (the cumulative average) when `cumulative`. var with C+1
    elements (sync BN) carries the count as its last element, which replaces `count`. An
    empty batch (count 0) is only counted."""
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    synced = var.numel() == mean.numel() + 1
    if count == 0 and not synced:
        return
    if cumulative:
        factor = num_batches_tracked.to(running_mean.dtype).reciprocal() \
            if num_batches_tracked is not None else 0.0
    else:
        factor = momentum
    if synced:
        var, n = var[:-1], var[-1]
        unbiased = var * (n / (n - 1).clamp_min(1))
    else:
        unbiased = var * (count / max(count - 1, 1))
    running_mean.mul_(1 - factor).add_(mean.to(running_mean.dtype) * factor)
    running_var.mul_(1 - factor).add_(unbiased.to(running_var.dtype) * factor)


def bn_backward_apply(grad_out: Tensor, out: Optional[Tensor], x: Tensor, mean: Tensor,
                      a: Tensor, b: Tensor, d: Tensor, x_d: Optional[Tensor],
                      mean_d: Optional[Tensor], a_d: Optional[Tensor], b_d: Optional[Tensor],
                      d_d: Optional[Tensor], grad_residual: bool) -> tuple[Tensor, Tensor]:
    acc = acc_dtype(x.dtype)
    nd = x.dim()
    fmt = memory_format(x)
    g = masked_grad(grad_out, out, acc)
    pc = lambda v: per_channel(v, nd)  # noqa: E731
    grad_x = (pc(a) * g + pc(b) * (x.to(acc) - pc(mean)) + pc(d)).to(x.dtype)
    if x_d is not None:
        grad_s = (pc(a_d) * g + pc(b_d) * (x_d.to(acc) - pc(mean_d)) + pc(d_d)).to(x.dtype)
    elif grad_residual:
        grad_s = g.to(x.dtype)
    else:
        grad_s = x.new_empty(0)
    if grad_s.numel():
        grad_s = grad_s.contiguous(memory_format=fmt)
    return grad_x.contiguous(memory_format=fmt), grad_s


# --- option-A shortcuts (csrc/option_a.cpp) --------------------------------------------------

def option_a_out_size(size: int, stride: int) -> int:
    """The block's output size for an input size: ceil(size / stride)."""
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


def bn_apply_option_a(x: Tensor, scale: Tensor, shift: Tensor, shortcut: Tensor, stride: int,
                      relu: bool) -> Tensor:
    """x*scale[c] + shift[c] + option_a_shortcut(shortcut), then ReLU; dtype and memory
    format of x, computed in the dtype of scale (the accumulation dtype)."""
    acc = scale.dtype
    out = x.to(acc) * per_channel(scale, 4) + per_channel(shift, 4)
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
    g = masked_grad(grad_out, out, acc)
    pc = lambda v: per_channel(v, 4)  # noqa: E731
    grad_x = (pc(a) * g + pc(b) * (x.to(acc) - pc(mean)) + pc(d)).to(x.dtype)
    grad_s = option_a_shortcut_backward(g.to(x.dtype).contiguous(memory_format=fmt),
                                        list(shortcut_size), stride)
    return grad_x.contiguous(memory_format=fmt), grad_s
