"""What the command-line tools share in their arguments: the model table and the argparse
types (bench, check, train, the degradation experiment, benchmarks/profile_step.py)."""
from __future__ import annotations

import argparse

# torchvision's ImageNet ResNets, all in the zoo (bench, check, train --compare)
MODELS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
          "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2")
# the paper's CIFAR family (fused_resnet/models/cifar.py): no torchvision twin, so train
# trains them without --compare
CIFAR_MODELS = ("cifar_resnet20", "cifar_resnet32", "cifar_resnet44", "cifar_resnet56",
                "cifar_resnet110", "cifar_resnet1202")
# the basic-block models, which also exist without shortcuts (shortcut=None): the plain and
# residual networks of the degradation experiment (degradation.py, train --compare-plain)
PLAIN_MODELS = CIFAR_MODELS + ("resnet18", "resnet34")


def _int_at_least(text: str, minimum: int, expected: str, must: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be {must}, got {value}")
    return value


def positive_int(text: str) -> int:
    return _int_at_least(text, 1, "a positive integer", "a positive integer (>= 1)")


def non_negative_int(text: str) -> int:
    return _int_at_least(text, 0, "an integer >= 0", ">= 0")


def comma_list(text: str, expected: str) -> list:
    """The non-empty items of a comma-separated value; `expected` says what, if none."""
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected {expected}")
    return items


def positive_int_list(text: str) -> list:
    return [positive_int(t) for t in comma_list(text, "one or more positive integers")]


def model_list(text: str) -> list:
    """Comma-separated names of MODELS, each once, in the order given."""
    items = comma_list(text, "a model name")
    for item in items:
        if item not in MODELS:
            raise argparse.ArgumentTypeError(
                f"unknown model {item!r}; choose from: {', '.join(MODELS)}")
    return list(dict.fromkeys(items))
