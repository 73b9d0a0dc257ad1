"""Autocast at the op boundary: the custom ops have no autocast kernels of their own, so
the modules cast convolution inputs and weights to the autocast dtype as eager's
autocast would for conv2d; batch-norm parameters, running statistics and all
reductions stay in float32."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def autocast_dtype(x: Tensor) -> Optional[torch.dtype]:
    """The autocast dtype for x's device, or None when autocast is off."""
    device = x.device.type
    if device in ("cuda", "cpu") and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return None


def cast(x: Tensor, dtype: Optional[torch.dtype]) -> Tensor:
    """x in `dtype` (floating-point tensors only; None: unchanged)."""
    return x if dtype is None or not x.is_floating_point() else x.to(dtype)
