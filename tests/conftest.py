import os

import pytest
import torch

if not torch.cuda.is_available():
    # The Triton kernels run on CPU tensors only interpreted, and @triton.jit fixes the
    # mode when fused_resnet.kernels is imported: before fused_resnet is.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fused_resnet  # noqa: E402


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64 (0 when both are zero)."""
    a, b = a.detach().double(), b.detach().double()
    denom = b.norm().item()
    diff = (a - b).norm().item()
    return diff / denom if denom > 0 else diff


# Backends whose operators run on this machine's CPU tensors. Triton on CPU runs only
# interpreted, and is tested by its own tests (tests/backends/test_triton_backend.py,
# tests/kernels/test_triton_kernels.py).
CPU_BACKENDS = [b for b in ("reference", "cpu") if b in fused_resnet.available_backends()]

# Relative-error tolerances against a float64 oracle fed the same (rounded) inputs:
# a few units of the dtype's rounding error (2^-53, 2^-24, 2^-11, 2^-8) after the
# reductions and normalisation of one conv + BN layer.
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    with fused_resnet.use_backend(request.param):
        yield request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(int(os.environ.get("FUSED_RESNET_TEST_SEED", "0")))
