"""The Triton kernels of fused_resnet.

Implicit-GEMM NHWC convolutions with fused batch-norm prologue / epilogue (conv.py),
the in-place ReLU mask of BN -> ReLU -> conv's backward (relu_mask.py), and the
backward kernels as torch.library custom operators (library.py). Importing this
package needs ``triton``; ``AVAILABLE`` says whether it imported (``IMPORT_ERROR``
why not). The interpreter mode is fixed at import (``@triton.jit`` reads it then): set
``TRITON_INTERPRET=1`` before importing fused_resnet to run the kernels on CPU tensors
(fp32 / fp16 only; bf16 is wrong there).
"""
try:
    from . import conv, library, relu_mask
    AVAILABLE = True
    IMPORT_ERROR = None
except ImportError as _e:  # triton missing (CPU-only or unsupported platform)
    conv = library = relu_mask = None
    AVAILABLE = False
    IMPORT_ERROR = _e


def is_interpreter() -> bool:
    """Whether the kernels run under the Triton interpreter (False when unavailable)."""
    return AVAILABLE and conv.is_interpreter()


__all__ = ["AVAILABLE", "IMPORT_ERROR", "conv", "library", "relu_mask", "is_interpreter"]
