"""torchvision-compatible ResNets whose blocks run the fused operators.

The classes subclass torchvision's ResNet / BasicBlock / Bottleneck and keep their
submodules (nn.Conv2d, nn.BatchNorm2d) as the holders of parameters and buffers, so
state_dict keys, order and shapes are torchvision's, checkpoints move both ways, and
`convert` only has to swap classes. Only `forward` changes:

training mode (per BN, as eager):          eval mode (BN folded into the convs):
  stem  conv_bn_relu -> maxpool              conv_bias_act(relu) -> maxpool
  block z1 = conv(x)                         y1 = conv_bias_act(x, relu)
        z2 = bn_relu_conv(z1)                y2 = conv_bias_act(y1, relu)
        z3 = bn_relu_conv(z2)   (bottleneck) s  = x or conv_bias_act(x)
        out = bn_add_relu(z3, x | (conv_d(x), bn_d))   out = conv_bias_act(y2, residual=s, relu)

Under autocast the convolution inputs and weights are cast to the autocast dtype at
the op boundary (as eager's autocast does for conv2d); batch-norm parameters, running
statistics and all reductions stay in float32.
"""
from __future__ import annotations

import copy
import os
import warnings
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import resnet as tv

from . import ops

__all__ = ["ResNet", "BasicBlock", "Bottleneck", "convert", "resnet18", "resnet34", "resnet50",
           "resnet101", "resnet152", "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d",
           "wide_resnet50_2", "wide_resnet101_2"]


# --- the op boundary: autocast, BN buffers, folding -------------------------------------

def _autocast_dtype(x: Tensor) -> Optional[torch.dtype]:
    device = x.device.type
    if device in ("cuda", "cpu") and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return None


def _cast(x: Tensor, dtype: Optional[torch.dtype]) -> Tensor:
    return x if dtype is None or not x.is_floating_point() else x.to(dtype)


def _conv_args(conv: nn.Conv2d) -> tuple:
    return list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups


def _bn_tensors(bn: nn.BatchNorm2d) -> tuple:
    """gamma, beta and the running buffers that eager batch norm would use."""
    tracked = not bn.training or bn.track_running_stats
    return (bn.weight, bn.bias, bn.running_mean if tracked else None,
            bn.running_var if tracked else None)


def _sync(bn: nn.BatchNorm2d) -> str:
    """Sync BN: the process-group key of a SyncBatchNorm2d (fused_resnet/distributed.py),
    passed to the fused ops; "" for a plain nn.BatchNorm2d."""
    return getattr(bn, "sync_group", "") if getattr(bn, "_fused_resnet_sync_bn", False) else ""


def _is_bn2d(m: nn.Module) -> bool:
    """nn.BatchNorm2d, or sync BN's subclass of it (same forward math, same state_dict)."""
    return type(m) is nn.BatchNorm2d or getattr(type(m), "_fused_resnet_sync_bn", False)


def _update_running_stats(bn: nn.BatchNorm2d, mean: Tensor, var: Tensor, z: Tensor) -> None:
    if bn.training and bn.track_running_stats:
        ops.update_running_stats(bn.running_mean, bn.running_var, bn.num_batches_tracked,
                                 mean, var, z.numel() // z.shape[1], bn.momentum)


def _use_folded(*bns: nn.BatchNorm2d) -> bool:
    """Eval mode with running statistics: BN is affine and folds into the conv - for
    inference. When gradients must reach gamma/beta, the unfolded eval-mode ops are
    used: through the folded bias d beta/d gamma would come out as a difference of
    large terms (sum g*z*invstd - mean*invstd*sum g), losing fp32 precision."""
    if torch.is_grad_enabled() and any(
            p is not None and p.requires_grad for bn in bns for p in (bn.weight, bn.bias)):
        return False
    return all(not bn.training and bn.running_mean is not None for bn in bns)


_FOLD_CACHE = "_fused_resnet_folded"  # attribute of an nn.Conv2d: (key, weight, bias)


def _folded_uncached(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple:
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    bias = -bn.running_mean * scale
    if bn.bias is not None:
        bias = bias + bn.bias
    weight = conv.weight * scale.to(conv.weight.dtype).reshape(-1, 1, 1, 1)
    return weight, bias


def _folded(conv: nn.Conv2d, bn: nn.BatchNorm2d, dtype) -> tuple:
    """(weight, bias) of conv with bn folded in, cached per version of the tensors it
    is made from (so once per optimizer step), unless gradients must flow through it."""
    tensors = [t for t in (conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var)
               if t is not None]
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    if needs_grad or torch.compiler.is_compiling():
        weight, bias = _folded_uncached(conv, bn)
        return _cast(weight, dtype), bias
    key = (dtype,) + tuple((t.data_ptr(), t._version, t.device, t.dtype) for t in tensors)
    hit = conv.__dict__.get(_FOLD_CACHE)
    if hit is None or hit[0] != key:
        with torch.no_grad():
            weight, bias = _folded_uncached(conv, bn)
            hit = (key, _cast(weight, dtype), bias)
        conv.__dict__[_FOLD_CACHE] = hit
    return hit[1], hit[2]


def _conv_bias_act(x: Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d,
                   residual: Optional[Tensor], relu: bool, dtype) -> Tensor:
    weight, bias = _folded(conv, bn, dtype)
    return ops.conv_bias_act(x, weight, bias, residual, *_conv_args(conv), relu)


def _bn_relu_conv(z: Tensor, bn: nn.BatchNorm2d, conv: nn.Conv2d, dtype) -> Tensor:
    out, mean, var = ops.bn_relu_conv(z, *_bn_tensors(bn), _cast(conv.weight, dtype),
                                      *_conv_args(conv), bn.training, bn.eps, True, _sync(bn))
    _update_running_stats(bn, mean, var, z)
    return out


def _conv(x: Tensor, conv: nn.Conv2d, dtype) -> Tensor:
    return F.conv2d(x, _cast(conv.weight, dtype), None, conv.stride, conv.padding,
                    conv.dilation, conv.groups)


def _projection(downsample: Optional[nn.Module]) -> Optional[tuple]:
    """(conv, bn) when the downsample is torchvision's 1x1 conv + BN, else None."""
    if (isinstance(downsample, nn.Sequential) and len(downsample) == 2
            and type(downsample[0]) is nn.Conv2d and _is_bn2d(downsample[1])
            and downsample[0].bias is None and downsample[0].padding_mode == "zeros"):
        return downsample[0], downsample[1]
    return None


def _block_tail(block, z: Tensor, x: Tensor, bn: nn.BatchNorm2d, dtype) -> Tensor:
    """relu(bn(z) + shortcut(x)) in training mode."""
    fused_tail = getattr(block.downsample, "fused_tail", None)
    if fused_tail is not None:  # option-A / no shortcut (fused_resnet/cifar.py), any mode
        return fused_tail(z, x, bn, dtype)
    proj = _projection(block.downsample)
    if proj is not None and proj[1].training == bn.training and _sync(proj[1]) == _sync(bn):
        conv_d, bn_d = proj
        z_d = _conv(x, conv_d, dtype)
        out, mean, var, mean_d, var_d = ops.bn_add_relu(
            z, *_bn_tensors(bn), None, z_d, *_bn_tensors(bn_d), bn.training, bn.eps,
            bn_d.eps, True, _sync(bn))
        _update_running_stats(bn_d, mean_d, var_d, z_d)
    else:
        shortcut = x if block.downsample is None else block.downsample(x)
        out, mean, var, _, _ = ops.bn_add_relu(
            z, *_bn_tensors(bn), _cast(shortcut, dtype), None, None, None, None, None,
            bn.training, bn.eps, bn.eps, True, _sync(bn))
    _update_running_stats(bn, mean, var, z)
    return out


def _eval_shortcut(block, x: Tensor, dtype) -> Tensor:
    proj = _projection(block.downsample)
    if proj is not None and _use_folded(proj[1]):
        return _conv_bias_act(x, proj[0], proj[1], None, False, dtype)
    return x if block.downsample is None else _cast(block.downsample(x), dtype)


def _check_input(x: Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"expected 4D input (got {x.dim()}D input)")


# --- blocks and network ---------------------------------------------------------------------

class BasicBlock(tv.BasicBlock):
    """torchvision's BasicBlock (same submodules and state_dict) on fused operators."""

    def forward(self, x: Tensor) -> Tensor:
        _check_input(x)
        dtype = _autocast_dtype(x)
        x = _cast(x, dtype)
        if _use_folded(self.bn1, self.bn2):
            y1 = _conv_bias_act(x, self.conv1, self.bn1, None, True, dtype)
            if hasattr(self.downsample, "fused_tail"):  # option A / plain: fused_resnet/cifar.py
                return _block_tail(self, _conv(y1, self.conv2, dtype), x, self.bn2, dtype)
            return _conv_bias_act(y1, self.conv2, self.bn2, _eval_shortcut(self, x, dtype),
                                  True, dtype)
        z1 = _conv(x, self.conv1, dtype)
        z2 = _bn_relu_conv(z1, self.bn1, self.conv2, dtype)
        return _block_tail(self, z2, x, self.bn2, dtype)


class Bottleneck(tv.Bottleneck):
    """torchvision's Bottleneck (same submodules and state_dict) on fused operators."""

    def forward(self, x: Tensor) -> Tensor:
        _check_input(x)
        dtype = _autocast_dtype(x)
        x = _cast(x, dtype)
        if _use_folded(self.bn1, self.bn2, self.bn3):
            y1 = _conv_bias_act(x, self.conv1, self.bn1, None, True, dtype)
            y2 = _conv_bias_act(y1, self.conv2, self.bn2, None, True, dtype)
            return _conv_bias_act(y2, self.conv3, self.bn3, _eval_shortcut(self, x, dtype),
                                  True, dtype)
        z1 = _conv(x, self.conv1, dtype)
        z2 = _bn_relu_conv(z1, self.bn1, self.conv2, dtype)
        z3 = _bn_relu_conv(z2, self.bn2, self.conv3, dtype)
        return _block_tail(self, z3, x, self.bn3, dtype)


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

    def _stem(self, x: Tensor) -> Tensor:
        _check_input(x)
        dtype = _autocast_dtype(x)
        x = _cast(x, dtype)
        if _use_folded(self.bn1):
            return _conv_bias_act(x, self.conv1, self.bn1, None, True, dtype)
        out, z, mean, var = ops.conv_bn_relu(
            x, _cast(self.conv1.weight, dtype), *_bn_tensors(self.bn1), *_conv_args(self.conv1),
            self.bn1.training, self.bn1.eps, True, _sync(self.bn1))
        _update_running_stats(self.bn1, mean, var, z)
        return out

    def _forward_impl(self, x: Tensor) -> Tensor:
        x = self.maxpool(self._stem(x))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


# --- conversion -----------------------------------------------------------------------------

_FUSED_CLASS = {tv.BasicBlock: BasicBlock, tv.Bottleneck: Bottleneck, tv.ResNet: ResNet}


def _check_convertible(block: nn.Module) -> None:
    for name in ("conv1", "conv2", "conv3"):
        conv = getattr(block, name, None)
        if conv is None:
            continue
        if type(conv) is not nn.Conv2d or conv.bias is not None or conv.padding_mode != "zeros" \
                or isinstance(conv.padding, str):
            raise ValueError(f"cannot fuse {type(block).__name__}.{name}: expected a bias-free "
                             f"nn.Conv2d with zero, numeric padding, got {conv!r}")
    for name in ("bn1", "bn2", "bn3"):
        bn = getattr(block, name, None)
        if bn is not None and not _is_bn2d(bn):
            raise ValueError(f"cannot fuse {type(block).__name__}.{name}: expected "
                             f"nn.BatchNorm2d, got {type(bn).__name__}")


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
        _check_convertible(module)
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
        module.__dict__.pop(_FOLD_CACHE, None)
        if type(module) in back:
            module.__class__ = back[type(module)]
    return model


# --- the model zoo ---------------------------------------------------------------------------

def _set_fixed(kwargs: dict, name: str, value: Any) -> None:
    if name in kwargs and kwargs[name] != value:
        raise ValueError(f"The parameter '{name}' expected value {value} but got {kwargs[name]} "
                         "instead.")
    kwargs[name] = value


def _read_weights(weights: Any) -> Optional[dict]:
    """weights= of the factories: a state_dict, or the path of a saved one."""
    if weights is None:
        return None
    if isinstance(weights, (str, os.PathLike)):
        weights = torch.load(weights, map_location="cpu", weights_only=True)
    elif not isinstance(weights, dict):
        raise TypeError("weights= takes a state_dict or the path of a saved one (downloads of "
                        f"pretrained weights are not supported), got {type(weights).__name__}")
    if "state_dict" in weights and isinstance(weights["state_dict"], dict):
        weights = weights["state_dict"]
    return weights


def _load_weights(model: nn.Module, weights: Any) -> None:
    weights = _read_weights(weights)
    if weights is not None:
        model.load_state_dict(weights, strict=True)


def _resnet(block, layers, weights, shortcut: Optional[str] = "B", **kwargs) -> ResNet:
    weights = _read_weights(weights)
    if weights is not None and "num_classes" not in kwargs and "fc.weight" in weights:
        kwargs["num_classes"] = weights["fc.weight"].shape[0]
    if shortcut != "B" and block is not BasicBlock:
        raise ValueError(f"shortcut={shortcut!r}: shortcut options A, C and None (plain) are "
                         "implemented for basic-block models (resnet18, resnet34, the CIFAR "
                         "family); bottleneck models have option B (projections) only")
    model = ResNet(block, layers, **kwargs)
    if shortcut != "B":
        from .cifar import set_shortcuts  # option A, C, plain: fused_resnet/cifar.py
        set_shortcuts(model, shortcut)
    _load_weights(model, weights)
    return model


_SHORTCUT_DOC = """
    shortcut: "B" (default: identity, 1x1 projections where the dimensions change; the
    state_dict is torchvision's), "A" (identity / subsample + zero-pad, no parameters),
    "C" (every shortcut a 1x1 projection) or None (the plain network, no shortcuts).
    A, C and None change the modules and so the state_dict keys (see fused_resnet/cifar.py).
    """


def resnet18(*, weights=None, progress: bool = True, shortcut: Optional[str] = "B",
             **kwargs) -> ResNet:
    return _resnet(BasicBlock, [2, 2, 2, 2], weights, shortcut, **kwargs)


def resnet34(*, weights=None, progress: bool = True, shortcut: Optional[str] = "B",
             **kwargs) -> ResNet:
    return _resnet(BasicBlock, [3, 4, 6, 3], weights, shortcut, **kwargs)


resnet18.__doc__ = "ResNet-18 on the fused operators." + _SHORTCUT_DOC
resnet34.__doc__ = "ResNet-34 on the fused operators." + _SHORTCUT_DOC


def resnet50(*, weights=None, progress: bool = True, **kwargs) -> ResNet:
    return _resnet(Bottleneck, [3, 4, 6, 3], weights, **kwargs)


def resnet101(*, weights=None, progress: bool = True, **kwargs) -> ResNet:
    return _resnet(Bottleneck, [3, 4, 23, 3], weights, **kwargs)


def resnet152(*, weights=None, progress: bool = True, **kwargs) -> ResNet:
    return _resnet(Bottleneck, [3, 8, 36, 3], weights, **kwargs)


def resnext50_32x4d(*, weights=None, progress: bool = True, **kwargs) -> ResNet:
    _set_fixed(kwargs, "groups", 32)
    _set_fixed(kwargs, "width_per_group", 4)
    return _resnet(Bottleneck, [3, 4, 6, 3], weights, **kwargs)


def resnext101_32x8d(*, weights=None, progress: bool = True, **kwargs) -> ResNet:
    _set_fixed(kwargs, "groups", 32)
    _set_fixed(kwargs, "width_per_group", 8)
    return _resnet(Bottleneck, [3, 4, 23, 3], weights, **kwargs)


def resnext101_64x4d(*, weights=None, progress: bool = True, **kwargs) -> ResNet:
    _set_fixed(kwargs, "groups", 64)
    _set_fixed(kwargs, "width_per_group", 4)
    return _resnet(Bottleneck, [3, 4, 23, 3], weights, **kwargs)


def wide_resnet50_2(*, weights=None, progress: bool = True, **kwargs) -> ResNet:
    _set_fixed(kwargs, "width_per_group", 64 * 2)
    return _resnet(Bottleneck, [3, 4, 6, 3], weights, **kwargs)


def wide_resnet101_2(*, weights=None, progress: bool = True, **kwargs) -> ResNet:
    _set_fixed(kwargs, "width_per_group", 64 * 2)
    return _resnet(Bottleneck, [3, 4, 23, 3], weights, **kwargs)
