"""How an operator of this folder is declared: torch.library.custom_op, with the names of
its inputs kept so that its backward formula can return gradients by name, and the
backward registered so that differentiating it (double backward) is refused."""
from __future__ import annotations

import functools
import inspect
from typing import Callable, Optional, Sequence

import torch

_INPUT_NAMES: dict = {}      # op name -> the names of its inputs, in order
_IMPLEMENTATIONS: dict = {}  # op name -> the Python function that computes it


def custom_op(name: str, mutates_args: Sequence[str] = ()) -> Callable:
    """torch.library.custom_op(name, mutates_args), remembering the inputs' names."""
    def register(fn):
        op = torch.library.custom_op(name, mutates_args=tuple(mutates_args))(fn)
        _INPUT_NAMES[name] = tuple(inspect.signature(fn).parameters)
        _IMPLEMENTATIONS[name] = fn
        return op
    return register


DOUBLE_BACKWARD = (
    "fused_resnet's fused operators are differentiable once: double backward "
    "(create_graph=True followed by another backward: gradient penalties, R1, MAML, "
    "Hessian-vector products) is not supported. Run fused_resnet.to_torchvision(model) "
    "for that")


def register_autograd(op, backward: Callable, setup_context: Callable) -> None:
    """op.register_autograd(backward, setup_context), with a backward that refuses to be
    differentiated: under create_graph=True its gradients carry a node that raises
    DOUBLE_BACKWARD when differentiated, so a second backward never sees silently
    missing terms."""
    @functools.wraps(backward)
    def once_differentiable(ctx, *grads):
        with torch.no_grad():
            outputs = backward(ctx, *grads)
        if not torch.is_grad_enabled():
            return outputs
        refuse = torch._C._functions.DelayedError(DOUBLE_BACKWARD.encode(), len(outputs))
        marked = [None if g is None else g.detach().requires_grad_() for g in outputs]
        return tuple(refuse(*marked))
    op.register_autograd(once_differentiable, setup_context=setup_context)


def gradients(op_name: str, **grads) -> tuple:
    """What the backward formula of `op_name` returns: the given gradients by input name,
    None for every other input."""
    names = _INPUT_NAMES[op_name]
    unknown = set(grads) - set(names)
    if unknown:
        raise TypeError(f"{op_name} has no input(s) {sorted(unknown)}")
    return tuple(grads.get(n) for n in names)


def python_implementation(op_name: str) -> Optional[Callable]:
    """The Python function behind `op_name` ("fused_resnet::bn_relu_conv"), None for an op
    not declared here (the compiled primitives): what a dispatch counter runs to see the
    ops inside an operator."""
    return _IMPLEMENTATIONS.get(op_name)
