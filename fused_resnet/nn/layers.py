"""The convolution-side glue every fused model uses: its arguments, the plain conv,
BN -> ReLU -> conv inside a block and the stem."""
from __future__ import annotations

from torch import Tensor, nn
import torch.nn.functional as F

from .. import ops
from .autocast import cast
from .batch_norm import StatsUpdate, bn_tensors, sync_key


def conv_args(conv: nn.Conv2d) -> tuple:
    """stride, padding, dilation, groups of an nn.Conv2d, as the fused ops take them."""
    return list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups


def check_input(x: Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"expected 4D input (got {x.dim()}D input)")


def conv(x: Tensor, conv: nn.Conv2d, dtype) -> Tensor:
    return F.conv2d(x, cast(conv.weight, dtype), None, conv.stride, conv.padding,
                    conv.dilation, conv.groups)


def bn_relu_conv(z: Tensor, bn: nn.BatchNorm2d, conv: nn.Conv2d, dtype) -> tuple:
    """conv(relu(bn(z))), and bn's running-statistics update for the block to do."""
    out, mean, var, _, _ = ops.bn_relu_conv(z, *bn_tensors(bn), cast(conv.weight, dtype),
                                            *conv_args(conv), bn.training, bn.eps, True,
                                            sync_key(bn))
    return out, StatsUpdate(bn, mean, var, z)
