"""torchvision-compatible ResNets whose blocks run the fused operators.

The classes subclass torchvision's ResNet / BasicBlock / Bottleneck and keep their
submodules (nn.Conv2d, nn.BatchNorm2d) as the holders of parameters and buffers, so
state_dict keys, order and shapes are torchvision's, checkpoints move both ways, and
`convert` only has to swap classes. Only `forward` changes:

training mode (per BN, as eager):          eval mode (running stats; nn/folding.py):
  stem  conv_bn_relu -> maxpool              conv_bias_act(relu) -> maxpool
  block z1 = conv(x)                         y1 = conv_bias_act(x, relu)
        z2 = bn_relu_conv(z1)                y2 = conv_bias_act(y1, relu)
        z3 = bn_relu_conv(z2)   (bottleneck) s  = x or conv_bias_act(x)
        out = bn_add_relu(z3, x | (conv_d(x), bn_d))   out = conv_bias_act(y2, residual=s, relu)

Under autocast the convolution inputs and weights are cast to the autocast dtype at
the op boundary (as eager's autocast does for conv2d; fused_resnet/nn/autocast.py);
batch-norm parameters, running statistics and all reductions stay in float32.
"""
from __future__ import annotations

import copy
import warnings
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn
from torchvision.models import resnet as tv

from ..nn import (autocast_dtype, bn_relu_conv, block_tail, cast, check_fusable, check_input,
                  conv, conv_bias_act, eval_shortcut, functorch_active, has_fused_tail,
                  refuse_scripting, set_shortcuts, stem, use_folded)
from . import weights as weights_api

__all__ = ["ResNet", "BasicBlock", "Bottleneck", "convert", "to_torchvision", "resnet18",
           "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
           "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2",
           "load_weights"]


# --- blocks and network ---------------------------------------------------------------------

class BasicBlock(tv.BasicBlock):
    """torchvision's BasicBlock (same submodules and state_dict) on fused operators."""

    __prepare_scriptable__ = refuse_scripting

    def forward(self, x: Tensor) -> Tensor:
        if functorch_active(x, self.conv1.weight):
            return super().forward(x)
        check_fusable(self)
        check_input(x)
        dtype = autocast_dtype(x)
        x = cast(x, dtype)
        if use_folded(self.bn1, self.bn2):
            y1 = conv_bias_act(x, self.conv1, self.bn1, None, True, dtype)
            if has_fused_tail(self):  # option A / plain: fused_resnet/nn/shortcuts.py
                return block_tail(self, conv(y1, self.conv2, dtype), x, self.bn2, dtype)
            return conv_bias_act(y1, self.conv2, self.bn2, eval_shortcut(self, x, dtype),
                                 True, dtype)
        z1 = conv(x, self.conv1, dtype)
        z2, update1 = bn_relu_conv(z1, self.bn1, self.conv2, dtype)
        return block_tail(self, z2, x, self.bn2, dtype, (update1,))


class Bottleneck(tv.Bottleneck):
    """torchvision's Bottleneck (same submodules and state_dict) on fused operators."""

    __prepare_scriptable__ = refuse_scripting

    def forward(self, x: Tensor) -> Tensor:
        if functorch_active(x, self.conv1.weight):
            return super().forward(x)
        check_fusable(self)
        check_input(x)
        dtype = autocast_dtype(x)
        x = cast(x, dtype)
        if use_folded(self.bn1, self.bn2, self.bn3):
            y1 = conv_bias_act(x, self.conv1, self.bn1, None, True, dtype)
            y2 = conv_bias_act(y1, self.conv2, self.bn2, None, True, dtype)
            return conv_bias_act(y2, self.conv3, self.bn3, eval_shortcut(self, x, dtype),
                                 True, dtype)
        z1 = conv(x, self.conv1, dtype)
        z2, update1 = bn_relu_conv(z1, self.bn1, self.conv2, dtype)
        z3, update2 = bn_relu_conv(z2, self.bn2, self.conv3, dtype)
        return block_tail(self, z3, x, self.bn3, dtype, (update1, update2))


class ResNet(tv.ResNet):
    """torchvision's ResNet (same constructor, submodules and state_dict) whose stem and
    blocks run the fused operators."""

    def __init__(self, block, layers, num_classes: int = 1000, zero_init_residual: bool = False,
                 groups: int = 1, width_per_group: int = 64,
                 replace_stride_with_dilation: Optional[list] = None,
                 norm_layer: Optional[Callable[..., nn.Module]] = None) -> None:
        if norm_layer is not None and norm_layer is not nn.BatchNorm2d:
            raise ValueError("fused_resnet fuses torch.nn.BatchNorm2d; norm_layer="
                             f"{norm_layer!r} is not supported (use torchvision's ResNet)")
        block = {tv.BasicBlock: BasicBlock, tv.Bottleneck: Bottleneck}.get(block, block)
        if block not in (BasicBlock, Bottleneck):
            raise ValueError(f"block must be BasicBlock or Bottleneck, got {block!r}")
        super().__init__(block, layers, num_classes, zero_init_residual, groups, width_per_group,
                         replace_stride_with_dilation, norm_layer)

    __prepare_scriptable__ = refuse_scripting

    def _forward_impl(self, x: Tensor) -> Tensor:
        if functorch_active(x, self.conv1.weight):
            return super()._forward_impl(x)
        check_fusable(self)
        x = self.maxpool(stem(x, self.conv1, self.bn1))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


# --- conversion -----------------------------------------------------------------------------

_FUSED_CLASS = {tv.BasicBlock: BasicBlock, tv.Bottleneck: Bottleneck, tv.ResNet: ResNet}


def convert(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Turn a torchvision ResNet, or any module containing torchvision BasicBlock /
    Bottleneck blocks, into its fused counterpart with the same parameters and buffers.

    Only classes are swapped (no tensor is copied); with inplace=False (the default)
    the model is deep-copied first. A module that is a subclass of torchvision's ResNet
    keeps its own forward (only its blocks are fused)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert expects an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    found = False
    for module in model.modules():
        fused = _FUSED_CLASS.get(type(module))
        if fused is None:
            continue
        check_fusable(module)
        module.__class__ = fused
        found = True
    if not found and not isinstance(model, (BasicBlock, Bottleneck, ResNet)):
        warnings.warn("fused_resnet.convert found no torchvision ResNet, BasicBlock or "
                      "Bottleneck in the model: nothing was converted", stacklevel=2)
    return model


def to_torchvision(model: nn.Module, inplace: bool = False) -> nn.Module:
    """The inverse of `convert`: plain torchvision classes, same tensors."""
    if not inplace:
        model = copy.deepcopy(model)
    back = {v: k for k, v in _FUSED_CLASS.items()}
    for module in model.modules():
        if type(module) in back:
            module.__class__ = back[type(module)]
    return model


# --- the model zoo ---------------------------------------------------------------------------

def _set_fixed(kwargs: dict, name: str, value: Any) -> None:
    if name in kwargs and kwargs[name] != value:
        raise ValueError(f"The parameter '{name}' expected value {value} but got {kwargs[name]} "
                         "instead.")
    kwargs[name] = value


def load_weights(model: nn.Module, weights: Any) -> None:
    """Load a state_dict (or the path of a saved one) into `model`, strictly."""
    state = weights_api.read_state_dict(weights)
    if state is not None:
        model.load_state_dict(state, strict=True)


def _resnet(block, layers, weights, progress: bool, enum_cls, shortcut: Optional[str] = "B",
            **kwargs) -> ResNet:
    pretrained, state = weights_api.resolve(weights, enum_cls)
    if pretrained is not None:   # as torchvision: the classes come from the weights
        _set_fixed(kwargs, "num_classes", len(pretrained.meta["categories"]))
        if shortcut != "B":
            raise ValueError(f"torchvision's weights are for option-B shortcuts, got "
                             f"shortcut={shortcut!r}")
    elif state is not None and "num_classes" not in kwargs and "fc.weight" in state:
        kwargs["num_classes"] = state["fc.weight"].shape[0]
    if shortcut != "B" and block is not BasicBlock:
        raise ValueError(f"shortcut={shortcut!r}: shortcut options A, C and None (plain) are "
                         "implemented for basic-block models (resnet18, resnet34, the CIFAR "
                         "family); bottleneck models have option B (projections) only")
    model = ResNet(block, layers, **kwargs)
    if shortcut != "B":  # option A, C, plain: fused_resnet/nn/shortcuts.py
        set_shortcuts(model, shortcut)
    if pretrained is not None:
        state = weights_api.state_dict_of(pretrained, progress)
    load_weights(model, state)
    return model


_SHORTCUT_DOC = """
    shortcut: "B" (default: identity, 1x1 projections where the dimensions change; the
    state_dict is torchvision's), "A" (identity / subsample + zero-pad, no parameters),
    "C" (every shortcut a 1x1 projection) or None (the plain network, no shortcuts).
    A, C and None change the modules and so the state_dict keys (fused_resnet/nn/shortcuts.py).
    """


def resnet18(*, weights=None, progress: bool = True, shortcut: Optional[str] = "B",
             **kwargs) -> ResNet:
    return _resnet(BasicBlock, [2, 2, 2, 2], weights, progress, tv.ResNet18_Weights, shortcut,
                   **kwargs)


def resnet34(*, weights=None, progress: bool = True, shortcut: Optional[str] = "B",
             **kwargs) -> ResNet:
    return _resnet(BasicBlock, [3, 4, 6, 3], weights, progress, tv.ResNet34_Weights, shortcut,
                   **kwargs)


resnet18.__doc__ = "ResNet-18 on the fused operators." + _SHORTCUT_DOC
resnet34.__doc__ = "ResNet-34 on the fused operators." + _SHORTCUT_DOC


def resnet50(*, weights=None, progress: bool = True, **kwargs) -> ResNet:
    return _resnet(Bottleneck, [3, 4, 6, 3], weights, progress, tv.ResNet50_Weights, **kwargs)


def resnet101(*, weights=None, progress: bool = True, **kwargs) -> ResNet:
    return _resnet(Bottleneck, [3, 4, 23, 3], weights, progress, tv.ResNet101_Weights, **kwargs)


def resnet152(*, weights=None, progress: bool = True, **kwargs) -> ResNet:
    return _resnet(Bottleneck, [3, 8, 36, 3], weights, progress, tv.ResNet152_Weights, **kwargs)


def resnext50_32x4d(*, weights=None, progress: bool = True, **kwargs) -> ResNet:
    _set_fixed(kwargs, "groups", 32)
    _set_fixed(kwargs, "width_per_group", 4)
    return _resnet(Bottleneck, [3, 4, 6, 3], weights, progress, tv.ResNeXt50_32X4D_Weights, **kwargs)


def resnext101_32x8d(*, weights=None, progress: bool = True, **kwargs) -> ResNet:
    _set_fixed(kwargs, "groups", 32)
    _set_fixed(kwargs, "width_per_group", 8)
    return _resnet(Bottleneck, [3, 4, 23, 3], weights, progress, tv.ResNeXt101_32X8D_Weights, **kwargs)


def resnext101_64x4d(*, weights=None, progress: bool = True, **kwargs) -> ResNet:
    _set_fixed(kwargs, "groups", 64)
    _set_fixed(kwargs, "width_per_group", 4)
    return _resnet(Bottleneck, [3, 4, 23, 3], weights, progress, tv.ResNeXt101_64X4D_Weights, **kwargs)


def wide_resnet50_2(*, weights=None, progress: bool = True, **kwargs) -> ResNet:
    _set_fixed(kwargs, "width_per_group", 64 * 2)
    return _resnet(Bottleneck, [3, 4, 6, 3], weights, progress, tv.Wide_ResNet50_2_Weights, **kwargs)


def wide_resnet101_2(*, weights=None, progress: bool = True, **kwargs) -> ResNet:
    _set_fixed(kwargs, "width_per_group", 64 * 2)
    return _resnet(Bottleneck, [3, 4, 23, 3], weights, progress, tv.Wide_ResNet101_2_Weights, **kwargs)
