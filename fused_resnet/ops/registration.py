"""How an operator of this folder is declared: torch.library.custom_op, with the names of
its inputs kept so that its backward formula can return gradients by name."""
from __future__ import annotations

import inspect
from typing import Callable, Sequence

import torch

_INPUT_NAMES: dict = {}   # op name -> the names of its inputs, in order


def custom_op(name: str, mutates_args: Sequence[str] = ()) -> Callable:
    """torch.library.custom_op(name, mutates_args), remembering the inputs' names."""
    def register(fn):
        op = torch.library.custom_op(name, mutates_args=tuple(mutates_args))(fn)
        _INPUT_NAMES[name] = tuple(inspect.signature(fn).parameters)
        return op
    return register


def gradients(op_name: str, **grads) -> tuple:
    """What the backward formula of `op_name` returns: the given gradients by input name,
    None for every other input."""
    names = _INPUT_NAMES[op_name]
    unknown = set(grads) - set(names)
    if unknown:
        raise TypeError(f"{op_name} has no input(s) {sorted(unknown)}")
    return tuple(grads.get(n) for n in names)
