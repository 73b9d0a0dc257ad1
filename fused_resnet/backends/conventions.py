"""The tensor conventions every backend follows (the contract of csrc/ops.cpp):
per-channel vectors in the accumulation dtype, outputs in the memory format of the
main input, every same-shaped operand walked in that one layout."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of reductions and per-channel vectors: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def memory_format(x: Tensor) -> torch.memory_format:
    """channels_last iff x is 4-D, channels_last and not also NCHW-contiguous."""
    if x.dim() == 4 and not x.is_contiguous() and \
            x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def like(t: Optional[Tensor], x: Tensor) -> Optional[Tensor]:
    """t in x's memory format (None passes): the kernels walk all operands in one layout."""
    return None if t is None else t.contiguous(memory_format=memory_format(x))


def channel_vector(x: Tensor, count: bool = False) -> Tensor:
    """An uninitialised [C] vector of x's accumulation dtype; count: one more element
    (sync BN's var output: the variance and then the global count)."""
    return x.new_empty(x.shape[1] + int(count), dtype=acc_dtype(x.dtype))


def per_channel(v: Tensor, ndim: int) -> Tensor:
    """A [C] vector viewed to broadcast over [N, C, ...]."""
    return v.view((1, -1) + (1,) * (ndim - 2))


def reduce_dims(x: Tensor) -> list:
    """The dimensions batch norm reduces over: all but the channel dimension."""
    return [0] + list(range(2, x.dim()))
