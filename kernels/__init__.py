"""Triton kernels of fused_resnet (installed as ``fused_resnet.kernels``).

Implicit-GEMM NHWC convolutions with fused batch-norm prologue / epilogue, see
``kernels/conv.py``.  Importing this package needs ``triton``; ``AVAILABLE`` says
whether it imported (the API functions then raise a clear RuntimeError when it did not).
Set ``TRITON_INTERPRET=1`` before the first import to run the kernels on CPU tensors
through the Triton interpreter (fp32 / fp16 only; bf16 is wrong there).
"""
try:
    from .conv import (BNGradPrologue, conv2d, conv2d_input_grad, conv2d_weight_grad,
                       conv_output_size, is_interpreter)
    AVAILABLE = True
    IMPORT_ERROR = None
except ImportError as _e:  # triton missing (CPU-only or unsupported platform)
    AVAILABLE = False
    IMPORT_ERROR = _e

    def _unavailable(*args, **kwargs):
        raise RuntimeError(f"fused_resnet.kernels needs triton, which failed to import: "
                           f"{IMPORT_ERROR}")

    conv2d = conv2d_input_grad = conv2d_weight_grad = _unavailable
    BNGradPrologue = conv_output_size = is_interpreter = _unavailable

__all__ = ["AVAILABLE", "IMPORT_ERROR", "BNGradPrologue", "conv2d", "conv2d_input_grad",
           "conv2d_weight_grad", "conv_output_size", "is_interpreter"]
