"""The shortcut of a residual block and the block's fused tail relu(bn(z) + shortcut(x)).

Shortcut options (ResNet paper, sec. 3.3), `shortcut=` of the CIFAR family and of
fused_resnet.resnet18 / resnet34 (basic-block models only):
    "A"   identity; where the dimensions change, the input subsampled with the block's
          stride and zero-padded with the extra channels: no parameters. One fused
          operator does BN + shortcut + add + ReLU (ops.bn_add_relu_option_a).
    "B"   identity, and a 1x1 projection (+ BN) where the dimensions change: torchvision's
          ResNet (state_dict identical to torchvision's).
    "C"   every shortcut a 1x1 projection (+ BN).
    None  no shortcut at all: the plain network of the degradation experiment.
A, C and None change the module structure, hence the state_dict: "A" and None have no
`downsample.*` entries, "C" has `layerX.Y.downsample.{0,1}.*` in every block. An option-A
or no-shortcut block carries an `OptionAShortcut` / `NoShortcut` module as its
`downsample`, which supplies the block's fused tail; as plain modules they compute the
same thing, so `to_torchvision` still gives a correct (unfused) model.
"""
from __future__ import annotations

from typing import Any, Optional

from torch import Tensor, nn
from torchvision.models import resnet as tv

from .. import ops
from ..backends.conventions import memory_format
from ..backends.primitives import option_a_shortcut
from .autocast import cast
from .batch_norm import (StatsUpdate, batch_norm, bn_tensors, is_fusable_bn, sync_key,
                         update_running_stats)
from .folding import conv_bias_act, use_folded
from .layers import conv

SHORTCUT_OPTIONS = ("A", "B", "C", None)


def check_option(shortcut: Any) -> Optional[str]:
    """The shortcut option, upper-cased; ValueError for anything but A, B, C or None."""
    option = shortcut.upper() if isinstance(shortcut, str) else shortcut
    if option not in SHORTCUT_OPTIONS:
        raise ValueError(f"shortcut must be 'A', 'B', 'C' or None (plain network), "
                         f"got {shortcut!r}")
    return option


# --- shortcut modules ---------------------------------------------------------------------

class FusedTailShortcut(nn.Module):
    """A block's `downsample` that supplies the whole fused tail relu(bn(z) + shortcut(x))
    itself (option A, no shortcut); as a plain module it computes the shortcut."""

    def fused_tail(self, z: Tensor, x: Tensor, bn: nn.BatchNorm2d, dtype,
                   pending: tuple = ()) -> Tensor:
        """relu(bn(z) + self(x)), and bn's running-statistics update together with the
        block's `pending` ones."""
        raise NotImplementedError


class OptionAShortcut(FusedTailShortcut):
    """Option A where a block changes dimensions: x[:, :, ::stride, ::stride] zero-padded
    from in_planes to planes channels. No parameters, no buffers."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        if planes < in_planes:
            raise ValueError(f"option A pads channels: planes ({planes}) must be >= in_planes "
                             f"({in_planes})")
        self.in_planes, self.planes, self.stride = in_planes, planes, stride

    def forward(self, x: Tensor) -> Tensor:
        return option_a_shortcut(x, self.planes, self.stride)

    def fused_tail(self, z: Tensor, x: Tensor, bn: nn.BatchNorm2d, dtype,
                   pending: tuple = ()) -> Tensor:
        """relu(bn(z) + forward(x)) as one operator (training or eval mode); with sync BN
        the shortcut is materialised and added by bn_add_relu."""
        x = cast(x, dtype)
        if sync_key(bn):
            return batch_norm(z, bn, self(x).contiguous(memory_format=memory_format(z)),
                              relu=True, pending=pending)
        out, mean, var = ops.bn_add_relu_option_a(z, *bn_tensors(bn), x, self.stride,
                                                  bn.training, bn.eps, True)
        update_running_stats(*pending, StatsUpdate(bn, mean, var, z))
        return out

    def extra_repr(self) -> str:
        return f"{self.in_planes}, {self.planes}, stride={self.stride}"


class NoShortcut(FusedTailShortcut):
    """The plain network's block: no shortcut. As a module it returns the zero shortcut
    (zeros of the block output's shape), so torchvision's BasicBlock.forward computes the
    plain block; the fused block adds nothing."""

    def __init__(self, planes: int, stride: int) -> None:
        super().__init__()
        self.planes, self.stride = planes, stride

    def forward(self, x: Tensor) -> Tensor:
        n, _, h, w = x.shape
        s = self.stride
        return x.new_zeros(n, self.planes, -(-h // s), -(-w // s))

    def fused_tail(self, z: Tensor, x: Tensor, bn: nn.BatchNorm2d, dtype,
                   pending: tuple = ()) -> Tensor:
        """relu(bn(z)) (training or eval mode)."""
        return batch_norm(z, bn, relu=True, pending=pending)

    def extra_repr(self) -> str:
        return f"planes={self.planes}, stride={self.stride}"


def _new_projection(in_planes: int, planes: int, stride: int) -> nn.Sequential:
    conv_d = nn.Conv2d(in_planes, planes, 1, stride, bias=False)
    nn.init.kaiming_normal_(conv_d.weight, mode="fan_out", nonlinearity="relu")
    return nn.Sequential(conv_d, nn.BatchNorm2d(planes))


def _is_projection(m: Optional[nn.Module]) -> bool:
    return (isinstance(m, nn.Sequential) and len(m) == 2 and type(m[0]) is nn.Conv2d
            and type(m[1]) is nn.BatchNorm2d)


def make_shortcut(option: Optional[str], in_planes: int, planes: int, stride: int,
                  current: Optional[nn.Module] = None) -> Optional[nn.Module]:
    """The `downsample` module of a basic block for a shortcut option (None: identity)."""
    changes = stride != 1 or in_planes != planes
    if option is None:
        return NoShortcut(planes, stride)
    if option == "A":
        return OptionAShortcut(in_planes, planes, stride) if changes else None
    if option == "B" and not changes:
        return None
    if _is_projection(current):  # B or C: keep an existing (initialised) projection
        return current
    return _new_projection(in_planes, planes, stride)


def set_shortcuts(model: nn.Module, shortcut: Optional[str]) -> nn.Module:
    """Give every basic block of `model` the shortcut of option shortcut ("A", "B", "C" or
    None), in place. Bottleneck models are not supported (ValueError)."""
    option = check_option(shortcut)
    blocks = [m for m in model.modules() if isinstance(m, tv.BasicBlock)]
    if any(isinstance(m, tv.Bottleneck) for m in model.modules()):
        raise ValueError("shortcut options are implemented for basic-block ResNets "
                         "(resnet18, resnet34, the CIFAR family); bottleneck models use "
                         "torchvision's projection shortcuts (option B) only")
    for block in blocks:
        stride = block.conv1.stride[0]
        block.downsample = make_shortcut(option, block.conv1.in_channels,
                                         block.conv2.out_channels, stride, block.downsample)
    return model


# --- the block's tail ---------------------------------------------------------------------------

def projection(downsample: Optional[nn.Module]) -> Optional[tuple]:
    """(conv, bn) when the downsample is torchvision's 1x1 conv + BN, else None."""
    if (isinstance(downsample, nn.Sequential) and len(downsample) == 2
            and type(downsample[0]) is nn.Conv2d and is_fusable_bn(downsample[1])
            and downsample[0].bias is None and downsample[0].padding_mode == "zeros"):
        return downsample[0], downsample[1]
    return None


def has_fused_tail(block: nn.Module) -> bool:
    """Option A / no shortcut: the downsample module supplies the block's tail."""
    return isinstance(block.downsample, FusedTailShortcut)


def block_tail(block, z: Tensor, x: Tensor, bn: nn.BatchNorm2d, dtype,
               pending: tuple = ()) -> Tensor:
    """relu(bn(z) + shortcut(x)) (training mode, or a FusedTailShortcut in any mode); the
    running statistics of the block's batch norms updated in one call, the `pending`
    updates of its earlier layers included."""
    if has_fused_tail(block):
        return block.downsample.fused_tail(z, x, bn, dtype, pending)
    proj = projection(block.downsample)
    if proj is not None and proj[1].training == bn.training and sync_key(proj[1]) == sync_key(bn):
        conv_d, bn_d = proj
        z_d = conv(x, conv_d, dtype)
        out, mean, var, mean_d, var_d = ops.bn_add_relu(
            z, *bn_tensors(bn), None, z_d, *bn_tensors(bn_d), bn.training, bn.eps,
            bn_d.eps, True, sync_key(bn))
        update_running_stats(*pending, StatsUpdate(bn, mean, var, z),
                             StatsUpdate(bn_d, mean_d, var_d, z_d))
        return out
    shortcut = x if block.downsample is None else block.downsample(x)
    return batch_norm(z, bn, cast(shortcut, dtype), relu=True, pending=pending)


def eval_shortcut(block, x: Tensor, dtype) -> Tensor:
    """The shortcut of a folded eval-mode block: the projection as a folded conv."""
    proj = projection(block.downsample)
    if proj is not None and use_folded(proj[1]):
        return conv_bias_act(x, proj[0], proj[1], None, False, dtype)
    return x if block.downsample is None else cast(block.downsample(x), dtype)
