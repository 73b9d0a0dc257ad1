"""The running-statistics update of training-mode batch norm, as a mutating operator
(custom ops with autograd must be functional, so the block ops return the batch
statistics and this one writes the buffers), for several BN layers at once: a block
updates all its batch norms in one call."""
from __future__ import annotations

from torch import Tensor

from ..backends import registry
from .registration import custom_op


@custom_op("fused_resnet::update_running_stats",
           mutates_args=("running_means", "running_vars", "num_batches_tracked"))
def update_running_stats(running_means: list[Tensor], running_vars: list[Tensor],
                         num_batches_tracked: list[Tensor], means: list[Tensor],
                         variances: list[Tensor], counts: list[int], momenta: list[float],
                         cumulative: list[bool]) -> None:
    """What training-mode torch.nn.BatchNorm does to its buffers, for layer i of the lists:
    count the batch (num_batches_tracked[i] += 1), then move the running mean / unbiased
    variance towards the batch's (means[i], variances[i] over counts[i] values per channel)
    by momenta[i], or by 1/num_batches_tracked[i] (the cumulative average, eager's
    momentum=None) where cumulative[i]. Sync BN: variances[i] has C+1 elements, the last
    the global count, which then replaces counts[i] (fused_resnet/backends/collectives.py).
    An empty batch (count 0) is only counted."""
    lists = (running_means, running_vars, num_batches_tracked, means, variances, counts,
             momenta, cumulative)
    if len({len(v) for v in lists}) != 1:
        raise ValueError(f"update_running_stats: the lists must have one entry per layer, got "
                         f"lengths {[len(v) for v in lists]}")
    if not running_means:
        return
    registry.resolve(running_means[0].device).update_running_stats(*lists)


@update_running_stats.register_fake
def _(running_means, running_vars, num_batches_tracked, means, variances, counts, momenta,
      cumulative):
    return None
