"""The running-statistics update of training-mode batch norm, as a mutating operator
(custom ops with autograd must be functional, so the block ops return the batch
statistics and this one writes the buffers)."""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from .registration import custom_op


@custom_op("fused_resnet::update_running_stats",
           mutates_args=("running_mean", "running_var", "num_batches_tracked"))
def update_running_stats(running_mean: Optional[Tensor], running_var: Optional[Tensor],
                         num_batches_tracked: Optional[Tensor], mean: Tensor, var: Tensor,
                         count: int, momentum: Optional[float]) -> None:
    """What training-mode torch.nn.BatchNorm does to its buffers: count the batch and
    move the running mean / unbiased variance towards the batch's (momentum=None: the
    cumulative average). Sync BN: var has C+1 elements, the last the global count, which
    then replaces `count` (fused_resnet/backends/collectives.py)."""
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    synced = var.dim() == 1 and var.numel() == mean.numel() + 1
    if running_mean is None or (count == 0 and not synced):   # an empty batch: counted only
        return
    if momentum is None:   # the cumulative average, 1 / num_batches_tracked (no host sync)
        factor = num_batches_tracked.to(running_mean.dtype).reciprocal() \
            if num_batches_tracked is not None else 0.0
    else:
        factor = momentum
    if synced:
        # sync BN (fused_resnet/backends/collectives.py): var carries the global count as a tensor
        var, n = var[:-1], var[-1]
        unbiased = var * (n / (n - 1).clamp_min(1))
    else:
        unbiased = var * (count / max(count - 1, 1))
    running_mean.mul_(1 - factor).add_(mean.to(running_mean.dtype) * factor)
    running_var.mul_(1 - factor).add_(unbiased.to(running_var.dtype) * factor)


@update_running_stats.register_fake
def _(running_mean, running_var, num_batches_tracked, mean, var, count, momentum):
    return None
