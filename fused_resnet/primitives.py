"""The four kernel-level primitives in plain PyTorch, and the fake kernels of their
compiled versions.

Every backend implements the same four memory-bound kernels (schemas and math in
csrc/ops.cpp): the `reference` backend uses the functions below, the `cpu` and
`cuda` backends the compiled `torch.ops.fused_resnet.*` operators. These functions
are also the oracle the compiled kernels are tested against.

Per-channel vectors are in the accumulation dtype: float64 for float64 input,
float32 for everything else.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _per_channel(v: Tensor, ndim: int) -> Tensor:
    return v.view((1, -1) + (1,) * (ndim - 2))


def _reduce_dims(x: Tensor) -> list:
    return [0] + list(range(2, x.dim()))


def bn_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance (two-pass, in acc dtype)."""
    xa = x.to(acc_dtype(x.dtype))
    dims = _reduce_dims(x)
    mean = xa.mean(dims)
    var = (xa - _per_channel(mean, x.dim())).square().mean(dims)
    return mean, var


def bn_apply(x: Tensor, scale: Tensor, shift: Tensor, residual: Optional[Tensor],
             x2: Optional[Tensor], scale2: Optional[Tensor], shift2: Optional[Tensor],
             relu: bool) -> Tensor:
    nd = x.dim()
    out = x.to(scale.dtype) * _per_channel(scale, nd) + _per_channel(shift, nd)
    if residual is not None:
        out = out + residual.to(scale.dtype)
    if x2 is not None:
        out = out + x2.to(scale.dtype) * _per_channel(scale2, nd) + _per_channel(shift2, nd)
    if relu:
        out = out.clamp_min(0)
    return out.to(x.dtype).contiguous(memory_format=memory_format(x))


def _masked_grad(grad_out: Tensor, out: Optional[Tensor], acc: torch.dtype) -> Tensor:
    g = grad_out.to(acc)
    if out is not None:
        # (out <= 0) -> 0, not (out > 0) -> g: a NaN output passes its gradient, as in eager.
        g = torch.where(out <= 0, torch.zeros((), dtype=acc, device=g.device), g)
    return g


def bn_backward_reduce(grad_out: Tensor, out: Optional[Tensor], x: Tensor, mean: Tensor,
                       x2: Optional[Tensor], mean2: Optional[Tensor]
                       ) -> tuple[Tensor, Tensor, Tensor]:
    acc = acc_dtype(x.dtype)
    nd = x.dim()
    dims = _reduce_dims(x)
    g = _masked_grad(grad_out, out, acc)
    sum_g = g.sum(dims)
    sum_g_xmu = (g * (x.to(acc) - _per_channel(mean, nd))).sum(dims)
    if x2 is not None:
        sum_g_xmu2 = (g * (x2.to(acc) - _per_channel(mean2, nd))).sum(dims)
    else:
        sum_g_xmu2 = sum_g.new_empty(0)
    return sum_g, sum_g_xmu, sum_g_xmu2


def bn_backward_apply(grad_out: Tensor, out: Optional[Tensor], x: Tensor, mean: Tensor,
                      a: Tensor, b: Tensor, d: Tensor, x2: Optional[Tensor],
                      mean2: Optional[Tensor], a2: Optional[Tensor], b2: Optional[Tensor],
                      d2: Optional[Tensor], grad_residual: bool) -> tuple[Tensor, Tensor]:
    acc = acc_dtype(x.dtype)
    nd = x.dim()
    fmt = memory_format(x)
    g = _masked_grad(grad_out, out, acc)
    pc = lambda v: _per_channel(v, nd)  # noqa: E731
    grad_x = (pc(a) * g + pc(b) * (x.to(acc) - pc(mean)) + pc(d)).to(x.dtype)
    if x2 is not None:
        grad_s = (pc(a2) * g + pc(b2) * (x2.to(acc) - pc(mean2)) + pc(d2)).to(x.dtype)
    elif grad_residual:
        grad_s = g.to(x.dtype)
    else:
        grad_s = x.new_empty(0)
    if grad_s.numel():
        grad_s = grad_s.contiguous(memory_format=fmt)
    return grad_x.contiguous(memory_format=fmt), grad_s


def memory_format(x: Tensor) -> torch.memory_format:
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


# --- fake (meta) kernels of the compiled primitives, so they trace under torch.compile
# and pass opcheck. Registered only when the extension defines the operators.

def register_fake_kernels() -> None:
    if not hasattr(torch.ops.fused_resnet, "bn_stats"):
        return
    reg = torch.library.register_fake

    def vec(x: Tensor) -> Tensor:
        return x.new_empty(x.shape[1], dtype=acc_dtype(x.dtype))

    @reg("fused_resnet::bn_stats")
    def _bn_stats_fake(x):
        return vec(x), vec(x)

    @reg("fused_resnet::bn_apply")
    def _bn_apply_fake(x, scale, shift, residual, x2, scale2, shift2, relu):
        return torch.empty_like(x, memory_format=memory_format(x))

    @reg("fused_resnet::bn_backward_reduce")
    def _bn_backward_reduce_fake(grad_out, out, x, mean, x2, mean2):
        return vec(x), vec(x), (vec(x) if x2 is not None else x.new_empty(0, dtype=acc_dtype(x.dtype)))

    @reg("fused_resnet::bn_backward_apply")
    def _bn_backward_apply_fake(grad_out, out, x, mean, a, b, d, x2, mean2, a2, b2, d2,
                                grad_residual):
        grad_x = torch.empty_like(x, memory_format=memory_format(x))
        if x2 is not None or grad_residual:
            return grad_x, torch.empty_like(x, memory_format=memory_format(x))
        return grad_x, x.new_empty(0)
