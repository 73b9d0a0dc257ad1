"""The `triton` backend: the block operators with their convolutions run by the Triton
implicit-GEMM kernels of fused_resnet.kernels, fused with the batch norm around them.

What runs where (per layer, see `TritonBackend.conv_impl`):

  conv_bn_relu   forward   z and its per-channel sum / sum of squares from ONE Triton conv
                           (statistics epilogue; no separate statistics pass over z), then
                           the BN+ReLU apply primitive.
                 backward  BN backward reduction (primitive), then the BN backward apply
                           folded into the loads of grad_out of the dgrad / wgrad kernels
                           (BNGradPrologue): grad_z is never materialised.
  bn_relu_conv   forward   statistics of z (primitive), then the Triton conv with BN+ReLU
                           in its PROLOGUE: y = relu(bn(z)) is never materialised.
                 backward  dy by the dgrad kernel; dW by the wgrad kernel with the same
                           prologue on z (again no y); the ReLU mask applied to dy in place
                           by a small Triton kernel that recomputes bn(z) <= 0 (no y, no
                           mask tensor); then the BN backward primitives.
  bn_add_relu    no convolution: the primitives only.
  conv_bias_act  forward   one Triton conv with the bias + residual + ReLU epilogue.
                 backward  the ReLU mask folded into the dgrad / wgrad loads; d bias by
                           the reduction primitive; the masked gradient is materialised
                           only when the residual needs its gradient.
  conv / conv_backward     the plain Triton kernels (weight gradient accumulated in fp32,
                           cast to the weight's dtype).

The primitives (statistics, apply, backward reduce / apply): the compiled CUDA kernels
of fused_resnet._C on CUDA tensors when the extension was built with them, the
plain-PyTorch reference primitives otherwise.

Fallback: a convolution the Triton kernels do not take runs the base-class path (ATen,
so cuDNN on a GPU, with the normalised activation / gradients materialised), with the
same primitives: float64 (the kernels are float16 / bfloat16 / float32 only; on CPU
float64 gives exactly the `reference` backend's results), contiguous (NCHW)
activations, bfloat16 under the Triton interpreter (computed wrongly there), tensors too
large for the kernels' int32 indexing, and CPU tensors unless the kernels run under the
interpreter (TRITON_INTERPRET=1 set before fused_resnet is imported).

Statistics from the epilogue: the kernel writes per-tile (count, mean, M2) partials of
z from its fp32 accumulator and a second small kernel merges them (Chan's formula, fixed
order): as accurate as a two-pass over z even when |mean| >> std, deterministic, and
nothing is read back to the host, so a training step is CUDA-graph capturable.
Sync BN conv_bn_relu uses the base path (Triton conv, statistics and backward sums
merged over the ranks, grad_z materialised).

torch.compile: the Triton calls of the backward formulas go through custom operators
with fake kernels (fused_resnet.kernels.library), so the block operators' backward
traces under AOTAutograd.
"""
from __future__ import annotations

import functools

import torch

from .. import kernels
from .base import Backend
from .conventions import acc_dtype, reduce_dims

__all__ = ["TritonBackend", "MEASURED_CONV_CHOICES", "conv_name"]

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# --- per-layer choice: Triton or ATen ---------------------------------------------------
#
# {(conv name, dtype name, block op): "triton" | "aten"}; conv name as the rows of
# benchmarks/bench_triton_conv.py: f"conv_{k}x{k}_s{stride}_{cin}_{cout}_{hw_in}", dtype
# name "bf16" / "fp16" / "fp32", block op one of "conv", "conv_bn_relu", "bn_relu_conv",
# "conv_bias_act" or "*" (any).
#
# TODO(gpu): fill from a GPU run of
#     python benchmarks/bench_triton_conv.py --dtype bf16 --batch 256   (and --dtype fp16)
# per shape: "bn_relu_conv" <- triton_fused_train vs cudnn_bn_relu_conv_stats,
# "conv_bn_relu" <- triton_conv_stats vs cudnn_conv_stats, "conv_bias_act" <-
# triton_eval_epilogue vs cudnn_conv_bias_res_relu, "conv" <- triton_conv vs cudnn_conv
# (and the triton_dgrad / triton_wgrad rows for the backward): "aten" where the Triton
# row's speedup_vs_cudnn < 1. Empty: every supported layer uses Triton.
MEASURED_CONV_CHOICES: dict = {}


def conv_name(x_shape, weight_shape, conv) -> str:
    """The layer's name in benchmarks/bench_triton_conv.py (square kernels / inputs;
    otherwise both sizes)."""
    kh, kw = weight_shape[2], weight_shape[3]
    k = f"{kh}" if kh == kw else f"{kh}x{kw}"
    s = conv.stride[0] if conv.stride[0] == conv.stride[1] else "x".join(map(str, conv.stride))
    hw = x_shape[2] if x_shape[2] == x_shape[3] else f"{x_shape[2]}x{x_shape[3]}"
    name = f"conv_{k}x{k}_s{s}" if kh == kw else f"conv_{k}_s{s}"
    return f"{name}_{x_shape[1]}_{weight_shape[0]}_{hw}"


_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


@functools.lru_cache(maxsize=None)
def _cached_vector(c: int, value: float, device: torch.device) -> torch.Tensor:
    return torch.full((c,), value, dtype=torch.float32, device=device)


def _constant_vector(like: torch.Tensor, value: float) -> torch.Tensor:
    """A read-only [C] fp32 vector of `value` for the channels of `like`: the coefficients
    of a plain ReLU mask folded into the backward convolutions. Made once per (C, value,
    device) for real tensors; fresh while tracing (fake tensors, symbolic sizes)."""
    c = like.shape[1]
    if type(like) is torch.Tensor and isinstance(c, int):
        return _cached_vector(c, value, like.device)
    return like.new_full((c,), value, dtype=torch.float32)


def _synced(bn) -> bool:
    """Sync BN with batch statistics (fused_resnet/backends/collectives.py)."""
    return bool(getattr(bn, "synced", False))


class TritonBackend(Backend):
    """Block operators whose convolutions run the Triton kernels (see the module
    docstring for what is fused where). float64 — and every case `conv_impl` sends to
    ATen — runs the base-class path (ATen convolutions + the same primitives), so on
    CPU float64 gives exactly the `reference` backend's results.

    cuda_primitives: the backend whose primitives run on CUDA tensors when it is built
    (the `cuda` backend); fallback_primitives: the one for every other case (reference)."""

    name = "triton"
    folds_eval_bn = True   # conv_bias_act: bias + residual + ReLU in the conv epilogue

    def __init__(self, cuda_primitives: Backend, fallback_primitives: Backend):
        self.cuda_primitives = cuda_primitives
        self.fallback_primitives = fallback_primitives

    def unavailable_reason(self, device):
        if not kernels.AVAILABLE:
            return f"the 'triton' backend needs triton: {kernels.IMPORT_ERROR}"
        if device.type == "cuda":
            return None if torch.cuda.is_available() else "CUDA is not available"
        if device.type == "cpu" and kernels.is_interpreter():
            return None
        return (f"the 'triton' backend runs on CUDA tensors (or CPU tensors under "
                f"TRITON_INTERPRET=1, set before fused_resnet is imported), got a tensor "
                f"on {device}")

    # -- the per-layer choice --
    def conv_impl(self, x: torch.Tensor, weight: torch.Tensor, conv, op: str = "conv") -> str:
        """"triton" or "aten": which implementation runs this convolution (and the
        fusions of block op `op` around it). Triton when the kernels run on the tensors'
        device (CUDA, or CPU under the interpreter), the dtype is float16 / bfloat16 /
        float32 (not bfloat16 under the interpreter), the input is channels_last and the
        sizes fit the kernels' int32 indexing; then MEASURED_CONV_CHOICES may still
        choose ATen (cuDNN) for this layer. ATen otherwise."""
        if x.dtype not in _KERNEL_DTYPES or weight.dtype != x.dtype or x.dim() != 4:
            return "aten"
        if not x.is_contiguous(memory_format=torch.channels_last) or x.numel() == 0:
            return "aten"
        if not kernels.AVAILABLE:
            return "aten"
        interp = kernels.is_interpreter()
        if x.device.type == "cpu":
            if not interp:
                return "aten"
        elif x.device.type != "cuda":
            return "aten"
        if interp and x.dtype == torch.bfloat16:
            return "aten"
        n, c, h, w = x.shape
        if c * h * w >= 2 ** 31 or n * h * w >= 2 ** 31 or weight.shape[0] * h * w >= 2 ** 31:
            return "aten"
        if MEASURED_CONV_CHOICES:
            name, dt = conv_name(x.shape, weight.shape, conv), _DTYPE_NAMES[x.dtype]
            choice = MEASURED_CONV_CHOICES.get((name, dt, op),
                                               MEASURED_CONV_CHOICES.get((name, dt, "*")))
            if choice in ("triton", "aten"):
                return choice
        return "triton"

    def _triton(self, x, weight, conv, op) -> bool:
        return self.conv_impl(x, weight, conv, op) == "triton"

    # -- the primitives: compiled CUDA kernels on CUDA tensors when built, else reference --
    def _prims(self, t: torch.Tensor) -> Backend:
        if t.device.type == "cuda" and self.cuda_primitives.unavailable_reason(t.device) is None:
            return self.cuda_primitives
        return self.fallback_primitives

    def bn_stats(self, x):
        return self._prims(x).bn_stats(x)

    def bn_apply(self, x, *args):
        return self._prims(x).bn_apply(x, *args)

    def bn_backward_reduce(self, grad_out, *args):
        return self._prims(grad_out).bn_backward_reduce(grad_out, *args)

    def bn_backward_apply(self, grad_out, *args):
        return self._prims(grad_out).bn_backward_apply(grad_out, *args)

    def bn_apply_option_a(self, x, *args):
        return self._prims(x).bn_apply_option_a(x, *args)

    def bn_backward_apply_option_a(self, grad_out, *args):
        return self._prims(grad_out).bn_backward_apply_option_a(grad_out, *args)

    # the per-channel finish steps: one CUDA kernel each when the extension is built
    def bn_scale_shift(self, mean, *args):
        return self._prims(mean).bn_scale_shift(mean, *args)

    def bn_stats_affine(self, x, *args):
        return self._prims(x).bn_stats_affine(x, *args)

    def bn_backward_coefficients(self, grad_out, *args):
        return self._prims(grad_out).bn_backward_coefficients(grad_out, *args)

    def bn_fold(self, weight, *args):
        return self._prims(weight).bn_fold(weight, *args)

    def bn_update_running_stats(self, running_means, *lists):
        return self._prims(running_means[0]).bn_update_running_stats(running_means, *lists)

    # -- convolution --
    @staticmethod
    def _geometry(conv) -> tuple:
        return tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation), conv.groups

    def conv(self, x, weight, conv, bias=None):
        if not self._triton(x, weight, conv, "conv"):
            return super().conv(x, weight, conv, bias)
        return kernels.conv.conv2d(x, weight, *self._geometry(conv), bias=bias)

    def _triton_conv_backward(self, grad, x, weight, conv, need_x, need_w, *,
                              bn_grad=(None,) * 6, in_scale=None, in_shift=None, in_relu=False):
        """dx, dw (None where not needed) by the Triton kernels, through the custom ops
        of fused_resnet.kernels.library; bn_grad = (z, out, mean, a, b, d) of a BN
        backward folded into the loads of grad, or Nones."""
        geo = [list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups]
        dx = dw = None
        if need_x:
            dx = torch.ops.fused_resnet.triton_conv_input_grad(grad, weight, list(x.shape), *geo,
                                                               *bn_grad)
        if need_w:
            dw = torch.ops.fused_resnet.triton_conv_weight_grad(x, grad, weight, *geo, in_scale,
                                                                in_shift, in_relu, *bn_grad)
        return dx, dw

    def conv_backward(self, grad, x, weight, conv, need_x, need_w):
        if not self._triton(x, weight, conv, "conv"):
            return super().conv_backward(grad, x, weight, conv, need_x, need_w)
        return self._triton_conv_backward(grad, x, weight, conv, need_x, need_w)

    # -- block operators --
    def conv_bn_relu_forward(self, x, weight, conv, bn, relu):
        if _synced(bn) or not self._triton(x, weight, conv, "conv_bn_relu"):
            # sync BN: the base path (Triton conv via self.conv, statistics merged over
            # the ranks by self.stats); ATen layers: the base path altogether
            return super().conv_bn_relu_forward(x, weight, conv, bn, relu)
        if bn.use_batch_stats:
            z, mean, var = kernels.conv.conv2d(x, weight, *self._geometry(conv), stats=True)
            scale, shift = self.bn_scale_shift(mean, var, bn.gamma, bn.beta, bn.eps)
        else:
            z = kernels.conv.conv2d(x, weight, *self._geometry(conv))
            mean, var, scale, shift = self.stats(z, bn)
        out = self.bn_apply(z, scale, shift, None, None, None, None, relu)
        return out, z, mean, var

    def conv_bn_relu_backward(self, grad_out, grad_z, x, weight, z, out, mean, var, conv, bn,
                              relu, need_x, need_w):
        if grad_z is not None or _synced(bn) or not self._triton(x, weight, conv,
                                                                 "conv_bn_relu"):
            # a gradient also reaches z directly, or sync BN (sums merged over the ranks
            # by self.bn_backward): grad_z is materialised, its convolutions still run
            # on Triton through self.conv_backward
            return super().conv_bn_relu_backward(grad_out, grad_z, x, weight, z, out, mean,
                                                 var, conv, bn, relu, need_x, need_w)
        mask_src = out if relu else None
        coef, _ = self.bn_backward_coefficients(grad_out, mask_src, z, mean, var, bn.gamma,
                                                bn.eps, bn.use_batch_stats, None, None, None,
                                                None, 0.0)
        bn_grad = (z, mask_src, mean, coef[0], coef[1], coef[2])
        dx, dw = self._triton_conv_backward(grad_out, x, weight, conv, need_x, need_w,
                                            bn_grad=bn_grad)
        return (dx, dw, None if bn.gamma is None else coef[3].to(bn.gamma.dtype),
                None if bn.beta is None else coef[4].to(bn.beta.dtype))

    def bn_relu_conv_forward(self, z, weight, conv, bn, relu):
        if not self._triton(z, weight, conv, "bn_relu_conv"):
            return super().bn_relu_conv_forward(z, weight, conv, bn, relu)
        mean, var, scale, shift = self.stats(z, bn)
        out = kernels.conv.conv2d(z, weight, *self._geometry(conv), in_scale=scale,
                                  in_shift=shift, in_relu=relu)
        return out, mean, var, scale, shift

    def bn_relu_conv_backward(self, grad_out, z, weight, mean, var, scale, shift, conv, bn,
                              relu, need_z, need_w):
        if not self._triton(z, weight, conv, "bn_relu_conv"):
            return super().bn_relu_conv_backward(grad_out, z, weight, mean, var, scale, shift,
                                                 conv, bn, relu, need_z, need_w)
        # dy always: the BN parameters' gradients need it even when z's is not asked for
        dy, dw = self._triton_conv_backward(grad_out, z, weight, conv, True, need_w,
                                            in_scale=scale, in_shift=shift, in_relu=relu)
        if relu:
            # autograd's ReLU mask is y <= 0 with y = relu(bn(z)) in z's dtype, i.e.
            # bn(z) rounded <= 0: applied to dy in place, y never materialised
            torch.ops.fused_resnet.triton_relu_mask_(
                dy, z.contiguous(memory_format=torch.channels_last), scale, shift)
        g = self.bn_backward(dy, None, z, mean, var, bn)
        return g.grad_x, dw, g.grad_gamma, g.grad_beta

    def conv_bias_act_forward(self, x, weight, bias, residual, conv, relu):
        if not self._triton(x, weight, conv, "conv_bias_act"):
            return super().conv_bias_act_forward(x, weight, bias, residual, conv, relu)
        return kernels.conv.conv2d(x, weight, *self._geometry(conv), bias=bias,
                                   residual=residual, out_relu=relu)

    def conv_bias_act_backward(self, grad_out, out, x, weight, conv, relu, need_x, need_w,
                               need_bias, need_residual):
        if not self._triton(x, weight, conv, "conv_bias_act"):
            return super().conv_bias_act_backward(grad_out, out, x, weight, conv, relu, need_x,
                                                  need_w, need_bias, need_residual)
        bn_grad = (None,) * 6
        if relu:   # grad_z = 1*g masked where out <= 0 (+ 0*(z - 0) + 0)
            zeros, ones = _constant_vector(out, 0.0), _constant_vector(out, 1.0)
            bn_grad = (out, out, zeros, ones, zeros, zeros)
        dx, dw = self._triton_conv_backward(grad_out, x, weight, conv, need_x, need_w,
                                            bn_grad=bn_grad)
        dbias = dres = None
        if need_bias or need_residual:
            g = torch.ops.aten.threshold_backward(grad_out, out, 0) if relu else grad_out
            dbias = g.sum(reduce_dims(g), dtype=acc_dtype(g.dtype)) if need_bias else None
            dres = g if need_residual else None
        return dx, dw, dbias, dres


