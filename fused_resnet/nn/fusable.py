"""What the fused forward can run, checked where it matters: by `convert`, and again at
every forward, since a model's submodules can be replaced or hooked after it was built
(the fused forward never calls its convs, batch norms and ReLUs as modules, so a
replaced activation or a hook on them would otherwise be ignored without a word).
Under torch.func transforms the fused operators cannot run (torch's custom operators
with autograd do not support them): the models then run torchvision's own forward."""
from __future__ import annotations

import torch
from torch import nn

from .batch_norm import is_fusable_bn

CONVS = ("conv1", "conv2", "conv3")
NORMS = ("bn1", "bn2", "bn3")


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def check_fusable(module: nn.Module) -> None:
    """ValueError naming the first submodule (conv1..3, bn1..3, relu) of a block or of a
    ResNet's stem that the fused forward cannot run as its module would."""
    where = type(module).__name__
    for name in CONVS:
        layer = getattr(module, name, None)
        if layer is None:
            continue
        if type(layer) is not nn.Conv2d or layer.bias is not None \
                or layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            raise ValueError(f"cannot fuse {where}.{name}: expected a bias-free "
                             f"nn.Conv2d with zero, numeric padding, got {layer!r}")
    for name in NORMS:
        bn = getattr(module, name, None)
        if bn is not None and not is_fusable_bn(bn):
            raise ValueError(f"cannot fuse {where}.{name}: expected "
                             f"nn.BatchNorm2d, got {type(bn).__name__}")
    relu = getattr(module, "relu", None)
    if relu is not None and type(relu) is not nn.ReLU:
        raise ValueError(f"cannot fuse {where}.relu: the fused operators apply ReLU, got "
                         f"{relu!r} (use torchvision's model, or fused_resnet.to_torchvision, "
                         "for other activations)")
    for name in CONVS + NORMS + ("relu",):
        layer = getattr(module, name, None)
        if layer is not None and _hooked(layer):
            raise ValueError(f"{where}.{name} has forward hooks, which the fused forward "
                             "does not call (it runs the block as fused operators): register "
                             "them on the block, or use fused_resnet.to_torchvision(model)")


def functorch_active(*tensors) -> bool:
    """Whether a torch.func transform (grad, vmap, jacrev, ...) is at work on these tensors
    (a module's input and parameters). Under torch.compile never: dynamo traces the fused
    operators itself."""
    if torch.compiler.is_compiling():
        return False
    return any(t is not None and torch._C._functorch.is_functorch_wrapped_tensor(t)
               for t in tensors)


def refuse_scripting(module: nn.Module):
    """What `__prepare_scriptable__` of the fused models does: TorchScript cannot
    compile the fused operators (Python custom operators)."""
    raise RuntimeError(
        f"torch.jit.script does not support fused_resnet's {type(module).__name__}: its "
        "fused operators are Python custom operators. Use torch.compile, torch.export or "
        "torch.jit.trace, or script fused_resnet.to_torchvision(model)")
