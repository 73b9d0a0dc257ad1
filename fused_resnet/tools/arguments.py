"""What the command-line tools share in their arguments: the model table and the argparse
types (bench, check, train, the degradation experiment, benchmarks/profile_step.py)."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import NoReturn, Optional

from ..backends import registry

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


def _float_check(text: str, ok, must: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (value == value and ok(value)):   # NaN fails every check
        raise argparse.ArgumentTypeError(f"must be {must}, got {text}")
    return value


def positive_float(text: str) -> float:
    return _float_check(text, lambda v: 0 < v < float("inf"), "a positive number")


def non_negative_float(text: str) -> float:
    return _float_check(text, lambda v: 0 <= v < float("inf"), "a number >= 0")


def training_batch(text: str) -> int:
    """A training batch size: batch norm's batch statistics need two images or more."""
    return _int_at_least(text, 2, "an integer >= 2",
                         ">= 2 (batch norm trains on the statistics of the batch)")


def backend_name(text: str) -> str:
    """A fused_resnet backend name known to the registry (available here or not)."""
    names = registry.backend_names()
    if text not in names:
        raise argparse.ArgumentTypeError(f"unknown backend {text!r}; choose from: "
                                         f"{', '.join(names)}")
    return text


def unwritable(path) -> Optional[str]:
    """Why files cannot be written into the directory `path` (None when they can): the
    nearest existing ancestor must be a writable directory."""
    p = Path(path).absolute()
    while not p.exists():
        p = p.parent
    if not p.is_dir():
        return f"{p} is not a directory"
    if not os.access(p, os.W_OK | os.X_OK):
        return f"{p} is not writable"
    return None


def usage_error(args: argparse.Namespace, message: str) -> NoReturn:
    """Exit 2 with an argparse-style one-line error (the subcommand's usage first)."""
    parser = getattr(args, "_parser", None)
    if parser is not None:
        parser.error(message)
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)
