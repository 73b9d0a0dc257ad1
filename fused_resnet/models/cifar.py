"""The ResNet paper's CIFAR-10 family on the fused operators, and its plain counterparts.

    fused_resnet.cifar_resnet20/32/44/56/110/1202(shortcut="A", num_classes=10)

CIFAR ResNets (paper, sec. 4.2): a 3x3 stem convolution with 16 filters, three stages of
n basic blocks (2n 3x3 layers) with 16, 32 and 64 filters on 32x32, 16x16 and 8x8 maps
(the first block of stages 2 and 3 subsamples with stride 2), global average pooling and
a 10-way fully connected layer: 6n + 2 weighted layers, n = 3, 5, 7, 9, 18, 200.

Shortcut options "A" (the paper's choice on CIFAR-10, so the default here), "B", "C"
and None (the plain network): fused_resnet/nn/shortcuts.py. The blocks are
fused_resnet.models.BasicBlock (same forward, same fused operators).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..nn import (check_fusable, check_option, functorch_active, make_shortcut, refuse_scripting,
                  stem)
from .resnet import BasicBlock, load_weights

__all__ = ["CifarResNet", "cifar_resnet20", "cifar_resnet32", "cifar_resnet44", "cifar_resnet56",
           "cifar_resnet110", "cifar_resnet1202"]


# --- the CIFAR network -------------------------------------------------------------------

class CifarResNet(nn.Module):
    """The paper's CIFAR-10 ResNet with n blocks per stage (depth 6n + 2) and shortcut
    option `shortcut` ("A" default, as in the paper; "B", "C", or None: plain)."""

    def __init__(self, n: int, num_classes: int = 10, shortcut: Optional[str] = "A",
                 zero_init_residual: bool = False, widths: tuple = (16, 32, 64)) -> None:
        super().__init__()
        if n < 1:
            raise ValueError(f"n (blocks per stage) must be >= 1, got {n}")
        self.shortcut = check_option(shortcut)
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

    __prepare_scriptable__ = refuse_scripting

    def forward(self, x: Tensor) -> Tensor:
        if functorch_active(x, self.conv1.weight):   # torch.func: the plain modules
            x = self.relu(self.bn1(self.conv1(x)))
        else:
            # the stem: conv_bn_relu (training) / conv_bias_act (eval), as the ImageNet models
            check_fusable(self)
            x = stem(x, self.conv1, self.bn1)
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _cifar(n: int, weights, kwargs) -> CifarResNet:
    model = CifarResNet(n, **kwargs)
    load_weights(model, weights)
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
