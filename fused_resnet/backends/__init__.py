"""The backends: which implementation of the primitives (and of the convolutions) the
fused operators run, and the registry that chooses among them.

    reference  plain PyTorch (primitives.py), any device
    cpu        C++ kernels of fused_resnet._C, CPU tensors
    cuda       CUDA kernels of fused_resnet._C (cuDNN convolutions via ATen), CUDA tensors
    triton     Triton kernels (fused_resnet.kernels), CUDA tensors, or CPU tensors
               under TRITON_INTERPRET=1
    auto       the highest-priority registered backend that runs on the tensor's device

A new backend: README.md beside this file.
"""
from .base import Backend, BNGrads
from .compiled import CompiledBackend, has_compiled_kernel
from .reference import ReferenceBackend
from .registry import (AUTO, BackendUnavailableError, available_backends, backend_names, get,
                       get_backend, register, resolve, set_backend, unavailable_reason,
                       use_backend)
from .triton import TritonBackend

# the built-in backends; `auto` prefers the compiled ones on their device
_reference = register(ReferenceBackend(), auto_priority=0)
register(CompiledBackend("cpu"), auto_priority=10)
_cuda = register(CompiledBackend("cuda"), auto_priority=10)
register(TritonBackend(cuda_primitives=_cuda, fallback_primitives=_reference))

__all__ = ["Backend", "BNGrads", "BackendUnavailableError", "CompiledBackend",
           "ReferenceBackend", "TritonBackend", "AUTO", "available_backends", "backend_names",
           "get", "get_backend", "has_compiled_kernel", "register", "resolve", "set_backend",
           "unavailable_reason", "use_backend"]
