"""The zoo by name, as torchvision's: `get_model(name, **kwargs)`, `list_models()`,
`get_model_weights(name)`."""
from __future__ import annotations

import fnmatch
from types import ModuleType
from typing import Iterable, Optional, Union

from torch import nn
from torchvision.models import resnet as tv

from . import cifar, resnet

BUILDERS = {
    "resnet18": resnet.resnet18, "resnet34": resnet.resnet34, "resnet50": resnet.resnet50,
    "resnet101": resnet.resnet101, "resnet152": resnet.resnet152,
    "resnext50_32x4d": resnet.resnext50_32x4d, "resnext101_32x8d": resnet.resnext101_32x8d,
    "resnext101_64x4d": resnet.resnext101_64x4d, "wide_resnet50_2": resnet.wide_resnet50_2,
    "wide_resnet101_2": resnet.wide_resnet101_2,
    "cifar_resnet20": cifar.cifar_resnet20, "cifar_resnet32": cifar.cifar_resnet32,
    "cifar_resnet44": cifar.cifar_resnet44, "cifar_resnet56": cifar.cifar_resnet56,
    "cifar_resnet110": cifar.cifar_resnet110, "cifar_resnet1202": cifar.cifar_resnet1202,
}

# torchvision's pretrained weights of the models that have them
WEIGHTS = {
    "resnet18": tv.ResNet18_Weights, "resnet34": tv.ResNet34_Weights,
    "resnet50": tv.ResNet50_Weights, "resnet101": tv.ResNet101_Weights,
    "resnet152": tv.ResNet152_Weights, "resnext50_32x4d": tv.ResNeXt50_32X4D_Weights,
    "resnext101_32x8d": tv.ResNeXt101_32X8D_Weights,
    "resnext101_64x4d": tv.ResNeXt101_64X4D_Weights,
    "wide_resnet50_2": tv.Wide_ResNet50_2_Weights,
    "wide_resnet101_2": tv.Wide_ResNet101_2_Weights,
}


def _builder(name: str):
    try:
        return BUILDERS[name.lower()]
    except KeyError:
        raise ValueError(f"Unknown model {name}") from None   # torchvision's error


def get_model(name: str, **config) -> nn.Module:
    """The model `name` built with `config` (weights=, num_classes=, ...), as
    torchvision.models.get_model."""
    return _builder(name)(**config)


def get_model_weights(name: str):
    """The torchvision Weights enum of model `name` (ValueError for a model without)."""
    _builder(name)
    try:
        return WEIGHTS[name.lower()]
    except KeyError:
        raise ValueError(f"{name} has no pretrained weights in torchvision") from None


def list_models(module: Optional[ModuleType] = None,
                include: Union[Iterable[str], str, None] = None,
                exclude: Union[Iterable[str], str, None] = None) -> list:
    """The names of the zoo's models, filtered with fnmatch patterns as
    torchvision.models.list_models (module: None, or fused_resnet / fused_resnet.models)."""
    if module is not None and not module.__name__.startswith("fused_resnet"):
        raise ValueError(f"fused_resnet.list_models lists fused_resnet's models, got module "
                         f"{module.__name__}")
    names = set(BUILDERS)
    if include:
        include = [include] if isinstance(include, str) else include
        names = set().union(*(fnmatch.filter(names, p) for p in include))
    if exclude:
        exclude = [exclude] if isinstance(exclude, str) else exclude
        for pattern in exclude:
            names -= set(fnmatch.filter(names, pattern))
    return sorted(names)
