"""Backend selection: which implementation of the four primitives (and of the
convolution) the fused operators run.

    reference  plain PyTorch (fused_resnet/primitives.py), any device
    cpu        C++ kernels of fused_resnet._C, CPU tensors
    cuda       CUDA kernels of fused_resnet._C (cuDNN convolutions via ATen), CUDA tensors
    triton     Triton kernels (fused_resnet.kernels), CUDA tensors, or CPU tensors
               under TRITON_INTERPRET=1
    auto       the fastest available one for the tensor's device

Choose with `set_backend(name)`, the `use_backend(name)` context manager or the
FUSED_RESNET_BACKEND environment variable. A backend asked for by name that is not
built or cannot run on the tensor's device raises BackendUnavailableError; only
`auto` chooses by itself.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator, NamedTuple, Optional

import torch

from . import distributed, primitives

BACKENDS = ("auto", "reference", "cpu", "cuda", "triton")


class BackendUnavailableError(RuntimeError):
    """The backend asked for is not built, or cannot run on the tensor's device."""


def _validate(name: str) -> str:
    if not isinstance(name, str) or name.strip().lower() not in BACKENDS:
        raise ValueError(f"unknown fused_resnet backend {name!r}; expected one of {BACKENDS}")
    return name.strip().lower()


_current = _validate(os.environ.get("FUSED_RESNET_BACKEND", "auto") or "auto")


def set_backend(name: str) -> None:
    """Select the backend for every fused operator called from now on."""
    global _current
    _current = _validate(name)


def get_backend() -> str:
    return _current


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """`with fused_resnet.use_backend("cpu"): ...` selects a backend for a block."""
    global _current
    previous, _current = _current, _validate(name)
    try:
        yield
    finally:
        _current = previous


# --- what is built and usable -------------------------------------------------------

def _has_compiled_kernel(dispatch_key: str) -> bool:
    if not hasattr(torch.ops.fused_resnet, "bn_stats"):
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("fused_resnet::bn_stats", dispatch_key)


def _triton_importable() -> bool:
    # the installed fused_resnet.kernels, or kernels/ of a source checkout, in the
    # current TRITON_INTERPRET mode (triton_backend.load_kernels)
    try:
        from .triton_backend import load_kernels
        load_kernels()
    except Exception:  # noqa: BLE001  (no triton, or a broken install: not available)
        return False
    return True


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def available_backends() -> list:
    """Backends that are built and usable on at least one device of this machine."""
    names = ["reference"]
    if _has_compiled_kernel("CPU"):
        names.append("cpu")
    if _has_compiled_kernel("CUDA") and torch.cuda.is_available():
        names.append("cuda")
    if (torch.cuda.is_available() or _triton_interpreted()) and _triton_importable():
        names.append("triton")
    return names


def unavailable_reason(name: str, device: torch.device) -> str | None:
    """Why backend `name` cannot run on `device`, or None when it can."""
    if name == "reference":
        return None
    if name == "cpu":
        if device.type != "cpu":
            return f"the 'cpu' backend runs on CPU tensors, got a tensor on {device}"
        if not _has_compiled_kernel("CPU"):
            return "the 'cpu' backend needs the compiled extension fused_resnet._C (pip install -e .)"
        return None
    if name == "cuda":
        if device.type != "cuda":
            return f"the 'cuda' backend runs on CUDA tensors, got a tensor on {device}"
        if not _has_compiled_kernel("CUDA"):
            return ("the 'cuda' backend is not built: rebuild with a CUDA toolkit present "
                    "(FUSED_RESNET_CUDA=1 pip install --no-build-isolation -e .)")
        return None
    if name == "triton":
        if device.type != "cuda" and not (device.type == "cpu" and _triton_interpreted()):
            return (f"the 'triton' backend runs on CUDA tensors (or CPU tensors under "
                    f"TRITON_INTERPRET=1), got a tensor on {device}")
        if not _triton_importable():
            return "the 'triton' backend needs triton and fused_resnet.kernels"
        return None
    raise ValueError(f"unknown backend {name!r}")


def resolve(device: torch.device, name: str | None = None) -> "Backend":
    """The backend object to run on `device`: the named one, or the current choice."""
    name = _validate(name or _current)
    if name == "auto":
        if device.type == "cuda":
            order = ("cuda", "reference")
        else:
            order = ("cpu", "reference")
        name = next(n for n in order if unavailable_reason(n, device) is None)
    else:
        why = unavailable_reason(name, device)
        if why is not None:
            raise BackendUnavailableError(f"fused_resnet backend {name!r} is unavailable: {why}")
    return _instances()[name]


# --- the backend objects ------------------------------------------------------------

class Backend:
    """A backend runs the four primitives; the block operators below are written once
    on top of them (convolutions through ATen, so cuDNN on a GPU). A backend with its
    own convolutions (Triton) overrides the block methods it fuses further.

    Per-channel tensors (mean, var, coefficients) are in the accumulation dtype."""

    name = "abstract"

    # -- the four primitives (schemas and math: csrc/ops.cpp) --
    def bn_stats(self, x):
        raise NotImplementedError

    def bn_apply(self, x, scale, shift, residual, x2, scale2, shift2, relu):
        raise NotImplementedError

    def bn_backward_reduce(self, grad_out, out, x, mean, x2, mean2):
        raise NotImplementedError

    def bn_backward_apply(self, grad_out, out, x, mean, a, b, d, x2, mean2, a2, b2, d2,
                          grad_residual):
        raise NotImplementedError

    # -- convolution --
    def conv(self, x, weight, conv):
        return torch.ops.aten.convolution(x, weight, None, *conv.args)

    def conv_backward(self, grad, x, weight, conv, need_x, need_w):
        gx, gw, _ = torch.ops.aten.convolution_backward(
            grad, x, weight, None, *conv.args, [need_x, need_w, False])
        return gx, gw

    # -- block operators: forward returns what ops.py saves, backward the gradients --
    def stats(self, z, bn):
        """Batch statistics in training mode, running statistics otherwise."""
        if bn.synced:  # sync BN: merged over the ranks (one all-reduce); var gets the count
            return distributed.sync_stats(bn.sync, z, [self.bn_stats(z)])
        if bn.use_batch_stats:
            return self.bn_stats(z)
        acc = primitives.acc_dtype(z.dtype)
        return bn.running_mean.to(acc).clone(), bn.running_var.to(acc).clone()

    def conv_bn_relu_forward(self, x, weight, conv, bn, relu):
        z = self.conv(x, weight, conv)
        mean, var = self.stats(z, bn)
        scale, shift = bn.scale_shift(mean, var)
        out = self.bn_apply(z, scale, shift, None, None, None, None, relu)
        return out, z, mean, var

    def conv_bn_relu_backward(self, grad_out, grad_z, x, weight, z, out, mean, var, conv, bn,
                              relu, need_x, need_w):
        g = self.bn_backward(grad_out, out if relu else None, z, mean, var, bn)
        dz = g.grad_x if grad_z is None else g.grad_x + grad_z
        dx, dw = self.conv_backward(dz, x, weight, conv, need_x, need_w)
        return dx, dw, g.grad_gamma, g.grad_beta

    def bn_relu_conv_forward(self, z, weight, conv, bn, relu):
        mean, var = self.stats(z, bn)
        scale, shift = bn.scale_shift(mean, var)
        y = self.bn_apply(z, scale, shift, None, None, None, None, relu)
        return self.conv(y, weight, conv), mean, var

    def bn_relu_conv_backward(self, grad_out, z, weight, mean, var, conv, bn, relu,
                              need_z, need_w):
        # The normalised activation was not saved: recompute it for the weight gradient.
        scale, shift = bn.scale_shift(mean, var)
        y = self.bn_apply(z, scale, shift, None, None, None, None, relu)
        dy, dw = self.conv_backward(grad_out, y, weight, conv, True, need_w)
        g = self.bn_backward(dy, y if relu else None, z, mean, var, bn)
        return g.grad_x, dw, g.grad_gamma, g.grad_beta

    def bn_add_relu_forward(self, z, bn, shortcut, z_d, bn_d, relu):
        if z_d is not None and bn.synced and bn_d.synced:
            # sync BN: the block's and the projection's statistics in one all-reduce
            mean, var, mean_d, var_d = distributed.sync_stats(
                bn.sync, z, [self.bn_stats(z), self.bn_stats(z_d)])
        else:
            mean, var = self.stats(z, bn)
        scale, shift = bn.scale_shift(mean, var)
        if z_d is None:
            out = self.bn_apply(z, scale, shift, shortcut, None, None, None, relu)
            return out, mean, var, None, None
        if not (bn.synced and bn_d.synced):
            mean_d, var_d = self.stats(z_d, bn_d)
        scale_d, shift_d = bn_d.scale_shift(mean_d, var_d)
        out = self.bn_apply(z, scale, shift, None, z_d, scale_d, shift_d, relu)
        return out, mean, var, mean_d, var_d

    def bn_add_relu_backward(self, grad_out, out, z, mean, var, bn, has_shortcut,
                             z_d, mean_d, var_d, bn_d, relu):
        return self.bn_backward(grad_out, out if relu else None, z, mean, var, bn,
                                grad_residual=has_shortcut, x2=z_d, mean2=mean_d,
                                var2=var_d, bn2=bn_d)

    def conv_bias_act_forward(self, x, weight, bias, residual, conv, relu):
        z = self.conv(x, weight, conv)
        acc = primitives.acc_dtype(z.dtype)
        ones = torch.ones(z.shape[1], dtype=acc, device=z.device)
        shift = bias.to(acc) if bias is not None else torch.zeros_like(ones)
        if residual is not None:
            residual = residual.contiguous(memory_format=primitives.memory_format(z))
        return self.bn_apply(z, ones, shift, residual, None, None, None, relu)

    def conv_bias_act_backward(self, grad_out, out, x, weight, conv, relu, need_x, need_w,
                               need_bias, need_residual):
        mask_src = out if relu else None
        acc = primitives.acc_dtype(out.dtype)
        c = out.shape[1]
        ones = torch.ones(c, dtype=acc, device=out.device)
        zeros = torch.zeros(c, dtype=acc, device=out.device)
        g, _ = self.bn_backward_apply(grad_out, mask_src, out, zeros, ones, zeros, zeros,
                                      None, None, None, None, None, False)
        dbias = self.bn_backward_reduce(grad_out, mask_src, out, zeros, None, None)[0] \
            if need_bias else None
        dx, dw = self.conv_backward(g, x, weight, conv, need_x, need_w)
        return dx, dw, dbias, (g if need_residual else None)

    def bn_backward(self, grad_out, out, x, mean, var, bn, grad_residual=False,
                    x2=None, mean2=None, var2=None, bn2=None):
        """BN (+ReLU mask, + identity or projected shortcut) backward: one reduction pass
        and one elementwise pass for both branches."""
        sum_g, sum_g_xmu, sum_g_xmu2 = self.bn_backward_reduce(grad_out, out, x, mean, x2, mean2)
        local = local2 = None
        sync = bn.sync if bn.synced else (bn2.sync if bn2 is not None and bn2.synced else "")
        if sync:  # sync BN: the sums of all ranks for grad_x (one all-reduce for both BNs);
            # this rank's sums for d gamma / d beta, which DDP averages
            local, local2 = (sum_g, sum_g_xmu), (sum_g, sum_g_xmu2)
            sum_g, sum_g_xmu, sum_g_xmu2 = distributed.sync_sums(sync, (sum_g, sum_g_xmu,
                                                                        sum_g_xmu2))
        a, b, d, grad_gamma, grad_beta = bn.grad_coefficients(x, var, sum_g, sum_g_xmu, local)
        a2 = b2 = d2 = grad_gamma2 = grad_beta2 = None
        if x2 is not None:
            a2, b2, d2, grad_gamma2, grad_beta2 = bn2.grad_coefficients(x2, var2, sum_g, sum_g_xmu2,
                                                                        local2)
        grad_x, grad_s = self.bn_backward_apply(grad_out, out, x, mean, a, b, d, x2, mean2,
                                                a2, b2, d2, grad_residual)
        return BNGrads(grad_x, grad_gamma, grad_beta, grad_s if grad_s.numel() else None,
                       grad_gamma2, grad_beta2)

    # -- option-A shortcut (fused_resnet/option_a.py, csrc/option_a.cpp) --------------------
    # Two more primitives: bn_apply / bn_backward_apply with the subsampled, zero-padded
    # shortcut. By default they are the common primitives with the shortcut (and its
    # gradient) materialised; ReferenceBackend and CompiledBackend fuse them.
    def bn_apply_option_a(self, x, scale, shift, shortcut, stride, relu):
        from .option_a import option_a_shortcut
        residual = option_a_shortcut(shortcut, x.shape[1], stride)
        residual = residual.contiguous(memory_format=primitives.memory_format(x))
        return self.bn_apply(x, scale, shift, residual, None, None, None, relu)

    def bn_backward_apply_option_a(self, grad_out, out, x, mean, a, b, d, shortcut_size,
                                   stride):
        from .option_a import option_a_shortcut_backward
        grad_x, g = self.bn_backward_apply(grad_out, out, x, mean, a, b, d, None, None, None,
                                           None, None, True)
        return grad_x, option_a_shortcut_backward(g, shortcut_size, stride)

    def bn_add_relu_option_a_forward(self, z, bn, shortcut, stride, relu):
        mean, var = self.stats(z, bn)
        scale, shift = bn.scale_shift(mean, var)
        return self.bn_apply_option_a(z, scale, shift, shortcut, stride, relu), mean, var

    def bn_add_relu_option_a_backward(self, grad_out, out, z, mean, var, bn, shortcut_size,
                                      stride):
        sum_g, sum_g_xmu, _ = self.bn_backward_reduce(grad_out, out, z, mean, None, None)
        a, b, d, grad_gamma, grad_beta = bn.grad_coefficients(z, var, sum_g, sum_g_xmu)
        grad_z, grad_s = self.bn_backward_apply_option_a(grad_out, out, z, mean, a, b, d,
                                                         list(shortcut_size), stride)
        return BNGrads(grad_z, grad_gamma, grad_beta, grad_s, None, None)
    # -- end option-A ------------------------------------------------------------------------

    def __repr__(self) -> str:
        return f"<fused_resnet backend {self.name!r}>"


class BNGrads(NamedTuple):
    grad_x: torch.Tensor
    grad_gamma: Optional[torch.Tensor]
    grad_beta: Optional[torch.Tensor]
    grad_shortcut: Optional[torch.Tensor]   # identity residual, or the projection's pre-BN input
    grad_gamma2: Optional[torch.Tensor]
    grad_beta2: Optional[torch.Tensor]


class ReferenceBackend(Backend):
    name = "reference"
    bn_stats = staticmethod(primitives.bn_stats)
    bn_apply = staticmethod(primitives.bn_apply)
    bn_backward_reduce = staticmethod(primitives.bn_backward_reduce)
    bn_backward_apply = staticmethod(primitives.bn_backward_apply)

    def bn_apply_option_a(self, *args):  # option A: plain PyTorch (fused_resnet/option_a.py)
        from .option_a import bn_apply_option_a
        return bn_apply_option_a(*args)

    def bn_backward_apply_option_a(self, *args):
        from .option_a import bn_backward_apply_option_a
        return bn_backward_apply_option_a(*args)


class CompiledBackend(Backend):
    """The C++ (CPU) and CUDA kernels: the same torch.ops, dispatched by device."""

    def __init__(self, name: str):
        self.name = name

    def bn_stats(self, x):
        return torch.ops.fused_resnet.bn_stats(x)

    def bn_apply(self, *args):
        return torch.ops.fused_resnet.bn_apply(*args)

    def bn_backward_reduce(self, *args):
        return torch.ops.fused_resnet.bn_backward_reduce(*args)

    def bn_backward_apply(self, *args):
        return torch.ops.fused_resnet.bn_backward_apply(*args)

    # option A: the compiled kernels when the extension has them, else Backend's default
    def bn_apply_option_a(self, *args):
        from .option_a import has_compiled_kernel
        if has_compiled_kernel(self.name):
            return torch.ops.fused_resnet.bn_apply_option_a(*args)
        return super().bn_apply_option_a(*args)

    def bn_backward_apply_option_a(self, *args):
        from .option_a import has_compiled_kernel
        if has_compiled_kernel(self.name):
            return torch.ops.fused_resnet.bn_backward_apply_option_a(*args)
        return super().bn_backward_apply_option_a(*args)


_INSTANCES: dict = {}


def _instances() -> dict:
    if not _INSTANCES:
        _INSTANCES.update(reference=ReferenceBackend(), cpu=CompiledBackend("cpu"),
                          cuda=CompiledBackend("cuda"))
        try:
            from .triton_backend import TritonBackend
            _INSTANCES["triton"] = TritonBackend()
        except ImportError:
            pass
    return _INSTANCES
