"""The model zoo: torchvision's ResNets on the fused operators (resnet.py: the ImageNet
family, convert, to_torchvision) and the ResNet paper's CIFAR family (cifar.py)."""
from .cifar import (CifarResNet, cifar_resnet20, cifar_resnet32, cifar_resnet44, cifar_resnet56,
                    cifar_resnet110, cifar_resnet1202)
from .registry import get_model, get_model_weights, list_models
from .resnet import (BasicBlock, Bottleneck, ResNet, convert, load_weights, resnet18, resnet34,
                     resnet50, resnet101, resnet152, resnext50_32x4d, resnext101_32x8d,
                     resnext101_64x4d, to_torchvision, wide_resnet50_2, wide_resnet101_2)

__all__ = ["get_model", "get_model_weights", "list_models", "BasicBlock", "Bottleneck", "ResNet", "convert", "load_weights", "to_torchvision",
           "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
           "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2",
           "CifarResNet", "cifar_resnet20", "cifar_resnet32", "cifar_resnet44",
           "cifar_resnet56", "cifar_resnet110", "cifar_resnet1202"]
