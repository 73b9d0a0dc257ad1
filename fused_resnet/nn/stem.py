"""The stem of the ResNets: conv -> BN -> ReLU as one fused op in training mode, the
folded conv_bias_act in eval mode."""
from __future__ import annotations

from torch import Tensor, nn

from .. import ops
from .autocast import autocast_dtype, cast
from .batch_norm import StatsUpdate, bn_tensors, sync_key, update_running_stats
from .folding import conv_bias_act, use_folded
from .layers import check_input, conv_args


def stem(x: Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> Tensor:
    """relu(bn(conv(x))) (before the max-pool of the ImageNet models)."""
    check_input(x)
    dtype = autocast_dtype(x)
    x = cast(x, dtype)
    if use_folded(bn):
        return conv_bias_act(x, conv, bn, None, True, dtype)
    out, z, mean, var = ops.conv_bn_relu(
        x, cast(conv.weight, dtype), *bn_tensors(bn), *conv_args(conv),
        bn.training, bn.eps, True, sync_key(bn))
    update_running_stats(StatsUpdate(bn, mean, var, z))
    return out
