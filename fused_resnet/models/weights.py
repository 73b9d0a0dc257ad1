"""`weights=` of the zoo: torchvision's pretrained weights (a Weights enum member, or its
name: "IMAGENET1K_V2", "DEFAULT", "ResNet50_Weights.IMAGENET1K_V2"), loaded through
torchvision's own machinery (the torch hub cache under TORCH_HOME, `progress=`), or a
state_dict, or the path of a saved one."""
from __future__ import annotations

import os
from typing import Any, Optional

import torch
from torchvision.models import WeightsEnum


def read_state_dict(weights: Any) -> Optional[dict]:
    """A state_dict from a dict or the path of a saved one (a checkpoint with a
    "state_dict" entry too)."""
    if weights is None:
        return None
    if isinstance(weights, (str, os.PathLike)):
        weights = torch.load(weights, map_location="cpu", weights_only=True)
    elif not isinstance(weights, dict):
        raise TypeError("weights= takes a torchvision Weights enum (or its name), a state_dict "
                        f"or the path of a saved one, got {type(weights).__name__}")
    if "state_dict" in weights and isinstance(weights["state_dict"], dict):
        weights = weights["state_dict"]
    return weights


def _names_weights(text: str, enum_cls) -> bool:
    """Whether a string is meant as a weights name rather than a path."""
    if os.path.exists(text):
        return False
    name = text.replace(enum_cls.__name__ + ".", "")
    return name in enum_cls.__members__ or not (os.sep in text or text.endswith((".pt", ".pth")))


def resolve(weights: Any, enum_cls: Optional[type]) -> tuple:
    """(torchvision Weights member or None, state_dict or None) for `weights=`.
    enum_cls: the model's Weights enum (None: the model has no pretrained weights). The
    wrong model's weights, or an unknown name, raise torchvision's own error."""
    if weights is None:
        return None, None
    if enum_cls is not None and (isinstance(weights, WeightsEnum)
                                 or (isinstance(weights, str)
                                     and _names_weights(weights, enum_cls))):
        return enum_cls.verify(weights), None
    if isinstance(weights, WeightsEnum):
        raise TypeError(f"this model has no torchvision weights; got {weights}")
    return None, read_state_dict(weights)


def state_dict_of(weights: WeightsEnum, progress: bool) -> dict:
    """The pretrained state_dict, as torchvision loads it (downloaded into the torch hub
    cache once, then read from there)."""
    return weights.get_state_dict(progress=progress, check_hash=True)
