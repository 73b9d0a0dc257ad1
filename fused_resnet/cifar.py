"""The ResNet paper's CIFAR-10 family on the fused operators, its shortcut options and
its plain counterparts.

    fused_resnet.cifar_resnet20/32/44/56/110/1202(shortcut="A", num_classes=10)

CIFAR ResNets (paper, sec. 4.2): a 3x3 stem convolution with 16 filters, three stages of
n basic blocks (2n 3x3 layers) with 16, 32 and 64 filters on 32x32, 16x16 and 8x8 maps
(the first block of stages 2 and 3 subsamples with stride 2), global average pooling and
a 10-way fully connected layer: 6n + 2 weighted layers, n = 3, 5, 7, 9, 18, 200.

Shortcut options (paper, sec. 3.3), `shortcut=` of the CIFAR family and of
fused_resnet.resnet18 / resnet34 (basic-block models only):
    "A"   identity; where the dimensions change, the input subsampled with the block's
          stride and zero-padded with the extra channels: no parameters. One fused
          operator does BN + shortcut + add + ReLU (fused_resnet.option_a). The paper's
          choice on CIFAR-10, so the default of the CIFAR family.
    "B"   identity, and a 1x1 projection (+ BN) where the dimensions change: torchvision's
          ResNet, the default of resnet18/34 (state_dict identical to torchvision's).
    "C"   every shortcut a 1x1 projection (+ BN).
    None  no shortcut at all: the plain network of the degradation experiment.
A, C and None change the module structure, hence the state_dict: "A" and None have no
`downsample.*` entries, "C" has `layerX.Y.downsample.{0,1}.*` in every block. Their
checkpoints load only into a model built with the same option.

The blocks are fused_resnet.models.BasicBlock (same forward, same fused operators); an
option-A or no-shortcut block carries an `OptionAShortcut` / `NoShortcut` module as its
`downsample`, which supplies the block's fused tail. As plain modules they compute the
same thing, so `to_torchvision` still gives a correct (unfused) model.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn
from torchvision.models import resnet as tv

from . import models, ops
from .models import (BasicBlock, ResNet, _bn_tensors, _cast, _load_weights,
                     _update_running_stats)
from .option_a import bn_add_relu_option_a, option_a_shortcut
from .primitives import memory_format

__all__ = ["CifarResNet", "OptionAShortcut", "NoShortcut", "set_shortcuts", "cifar_resnet20",
           "cifar_resnet32", "cifar_resnet44", "cifar_resnet56", "cifar_resnet110",
           "cifar_resnet1202", "SHORTCUT_OPTIONS"]

SHORTCUT_OPTIONS = ("A", "B", "C", None)


def _sync(bn: nn.BatchNorm2d) -> str:
    """Sync BN's process-group key (fused_resnet/distributed.py), "" for nn.BatchNorm2d."""
    sync = getattr(models, "_sync", None)
    return sync(bn) if sync is not None else ""


def _bn_add_relu(z: Tensor, bn: nn.BatchNorm2d, shortcut: Optional[Tensor]) -> tuple:
    sync = _sync(bn)
    extra = {"sync_group": sync} if sync else {}
    return ops.bn_add_relu(z, *_bn_tensors(bn), shortcut, None, None, None, None, None,
                           bn.training, bn.eps, bn.eps, True, **extra)


def _check_option(shortcut: Any) -> Optional[str]:
    option = shortcut.upper() if isinstance(shortcut, str) else shortcut
    if option not in SHORTCUT_OPTIONS:
        raise ValueError(f"shortcut must be 'A', 'B', 'C' or None (plain network), "
                         f"got {shortcut!r}")
    return option


# --- shortcut modules ---------------------------------------------------------------------

class OptionAShortcut(nn.Module):
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

    def fused_tail(self, z: Tensor, x: Tensor, bn: nn.BatchNorm2d, dtype) -> Tensor:
        """relu(bn(z) + forward(x)) as one operator (training or eval mode); with sync BN
        the shortcut is materialised and added by bn_add_relu."""
        x = _cast(x, dtype)
        if _sync(bn):
            out, mean, var, _, _ = _bn_add_relu(z, bn, self(x).contiguous(
                memory_format=memory_format(z)))
        else:
            out, mean, var = bn_add_relu_option_a(z, *_bn_tensors(bn), x, self.stride,
                                                  bn.training, bn.eps, True)
        _update_running_stats(bn, mean, var, z)
        return out

    def extra_repr(self) -> str:
        return f"{self.in_planes}, {self.planes}, stride={self.stride}"


class NoShortcut(nn.Module):
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

    def fused_tail(self, z: Tensor, x: Tensor, bn: nn.BatchNorm2d, dtype) -> Tensor:
        """relu(bn(z)) (training or eval mode)."""
        out, mean, var, _, _ = _bn_add_relu(z, bn, None)
        _update_running_stats(bn, mean, var, z)
        return out

    def extra_repr(self) -> str:
        return f"planes={self.planes}, stride={self.stride}"


def _projection(in_planes: int, planes: int, stride: int) -> nn.Sequential:
    conv = nn.Conv2d(in_planes, planes, 1, stride, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return nn.Sequential(conv, nn.BatchNorm2d(planes))


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
    return _projection(in_planes, planes, stride)


def set_shortcuts(model: nn.Module, shortcut: Optional[str]) -> nn.Module:
    """Give every basic block of `model` the shortcut of option shortcut ("A", "B", "C" or
    None), in place. Bottleneck models are not supported (ValueError)."""
    option = _check_option(shortcut)
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


# --- the CIFAR network -------------------------------------------------------------------

class CifarResNet(nn.Module):
    """The paper's CIFAR-10 ResNet with n blocks per stage (depth 6n + 2) and shortcut
    option `shortcut` ("A" default, as in the paper; "B", "C", or None: plain)."""

    def __init__(self, n: int, num_classes: int = 10, shortcut: Optional[str] = "A",
                 zero_init_residual: bool = False, widths: tuple = (16, 32, 64)) -> None:
        super().__init__()
        if n < 1:
            raise ValueError(f"n (blocks per stage) must be >= 1, got {n}")
        self.shortcut = _check_option(shortcut)
        self.depth = 6 * n + 2
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(widths[0], n, 1)
        self.layer2 = self._make_layer(widths[1], n, 2)
        self.layer3 = self._make_layer(widths[2], n, 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[2], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for i in range(blocks):
            s = stride if i == 0 else 1
            downsample = make_shortcut(self.shortcut, self.inplanes, planes, s)
            layers.append(BasicBlock(self.inplanes, planes, s, downsample))
            self.inplanes = planes
        return nn.Sequential(*layers)

    _stem = ResNet._stem  # conv_bn_relu (training) / conv_bias_act (eval), as the ImageNet models

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.layer1(self._stem(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _cifar(n: int, weights, kwargs) -> CifarResNet:
    model = CifarResNet(n, **kwargs)
    _load_weights(model, weights)
    return model


_DOC = """CIFAR ResNet-{depth} (n = {n}, {params} parameters with option A in the paper).

    shortcut: "A" (default, the paper's choice on CIFAR: parameter-free identity /
    subsample + zero-pad shortcuts, one fused operator), "B" (1x1 projections where the
    dimensions change), "C" (all shortcuts projections) or None (the plain network).
    weights: a state_dict (or its path) saved from a model with the same shortcut option.
    Other keyword arguments go to CifarResNet (num_classes=10, zero_init_residual)."""


def _factory(depth: int, params: str):
    n = (depth - 2) // 6

    def build(*, shortcut: Optional[str] = "A", num_classes: int = 10, weights=None,
              progress: bool = True, **kwargs) -> CifarResNet:
        return _cifar(n, weights, dict(kwargs, shortcut=shortcut, num_classes=num_classes))

    build.__name__ = build.__qualname__ = f"cifar_resnet{depth}"
    build.__doc__ = _DOC.format(depth=depth, n=n, params=params)
    return build


cifar_resnet20 = _factory(20, "0.27M")
cifar_resnet32 = _factory(32, "0.46M")
cifar_resnet44 = _factory(44, "0.66M")
cifar_resnet56 = _factory(56, "0.85M")
cifar_resnet110 = _factory(110, "1.7M")
cifar_resnet1202 = _factory(1202, "19.4M")
