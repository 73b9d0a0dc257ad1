"""The `triton` backend: the block operators with their convolutions run by the Triton
implicit-GEMM kernels of `fused_resnet.kernels` (kernels/conv.py), fused with the batch
norm around them.

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

The four primitives (statistics, apply, backward reduce / apply): the compiled CUDA
kernels of fused_resnet._C on CUDA tensors when the extension was built with them, the
plain-PyTorch reference primitives (fused_resnet.primitives) otherwise.

Fallback: a convolution the Triton kernels do not take runs the base-class path (ATen,
so cuDNN on a GPU, with the normalised activation / gradients materialised), with the
same primitives. That is the case for float64 (the kernels are float16 / bfloat16 /
float32 only: float64 works on this backend, through ATen and the primitives above, and
on CPU gives exactly the `reference` backend's results), for contiguous (NCHW) activations,
for bfloat16 under the Triton interpreter (computed wrongly there), for tensors too large
for the kernels' int32 indexing, and for CPU tensors unless the kernels run under the
interpreter (TRITON_INTERPRET=1 set before they were imported).

Statistics from the epilogue: the kernel returns fp32 sums of z and z^2, so
var = E[z^2] - E[z]^2, which cancels when |mean| >> std (relative error of var about
2^-24 * (1 + mean^2/var), versus about 2^-24 for the two-pass reference). Measured in
fp32 under the interpreter (tests/test_triton_backend.py::test_epilogue_stats_accuracy,
run with -s): |mean|/std >= 0.2: var rel. error 8.9e-8 one-pass vs 2.4e-8 two-pass;
|mean|/std >= 720: 0.1 one-pass vs 7.3e-6 two-pass. So when any channel has
mean^2 > STATS_GUARD_RATIO * var (|mean| > 8 std) the statistics are recomputed two-pass
from z: on that large-mean test conv_bn_relu's output error is then 4.2e-5 (reference
backend 4.8e-5; 1.9e-2 without the guard). The check costs one host sync per training
conv_bn_relu (the stem); it is skipped while a CUDA graph is being captured.
Sync BN (fused_resnet/distributed.py) conv_bn_relu uses the base path (Triton conv,
statistics and backward sums merged over the ranks, grad_z materialised).

torch.compile: the Triton calls of the backward formulas go through custom operators
with fake kernels (fused_resnet::triton_conv_input_grad, triton_conv_weight_grad,
triton_relu_mask_), so the block operators' backward traces under AOTAutograd.

Importing: `fused_resnet.kernels` is the top-level kernels/ folder mapped by setup.py's
package_dir, importable once the package is installed (pip install -e .). In a source
checkout that is not installed, `load_kernels` loads kernels/ from the source tree and
registers it as `fused_resnet.kernels`. The interpreter mode of the kernels is fixed
when they are imported; if they were imported with another TRITON_INTERPRET setting than
the current one, a fresh copy is loaded for the current setting.
"""
import contextlib
import importlib.util
import os
import sys
from typing import Optional

import torch
from torch import Tensor

from . import backends
from .backends import Backend

try:
    import triton
    import triton.language as tl
except ImportError:  # the backend is then unavailable (backends.unavailable_reason)
    triton = tl = None

__all__ = ["TritonBackend", "load_kernels", "MEASURED_CONV_CHOICES", "STATS_GUARD_RATIO"]

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Recompute the batch statistics two-pass when some channel has mean^2 > ratio * var
# (the one-pass variance then loses more than log2(ratio) of fp32's 24 bits).
STATS_GUARD_RATIO = 64.0

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


# --- loading the kernels ------------------------------------------------------------------

_KERNELS: dict = {}   # interpreter mode (bool) -> kernels module


def _interpret_wanted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _source_kernels_dir() -> str:
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")


def _load_from_source(name: str, directory: Optional[str] = None):
    directory = directory or _source_kernels_dir()
    init = os.path.join(directory, "__init__.py")
    if not os.path.exists(init):
        raise ImportError(f"fused_resnet.kernels is not installed and {init} does not exist")
    spec = importlib.util.spec_from_file_location(name, init,
                                                  submodule_search_locations=[directory])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def load_kernels():
    """The Triton kernels module (fused_resnet.kernels), for the current TRITON_INTERPRET
    setting. Raises ImportError when triton or the kernels cannot be imported."""
    want = _interpret_wanted()
    module = _KERNELS.get(want)
    if module is not None:
        return module
    try:
        from . import kernels as module   # installed: setup.py's package_dir
    except ImportError:
        # source checkout: kernels/ next to fused_resnet/, registered under the package
        module = _load_from_source("fused_resnet.kernels")
        setattr(sys.modules[__package__], "kernels", module)
    if not getattr(module, "AVAILABLE", False):
        raise ImportError("fused_resnet.kernels needs triton: "
                          f"{getattr(module, 'IMPORT_ERROR', '')}")
    if module.is_interpreter() != want:
        # imported before TRITON_INTERPRET was (un)set: @triton.jit fixed the mode then
        name = "fused_resnet._kernels_interpreted" if want else "fused_resnet._kernels_compiled"
        module = sys.modules.get(name) or _load_from_source(
            name, os.path.dirname(os.path.abspath(module.__file__)))
        if not module.AVAILABLE or module.is_interpreter() != want:
            raise ImportError("could not load fused_resnet.kernels in the current "
                              f"TRITON_INTERPRET={int(want)} mode")
    _KERNELS[want] = module
    return module


# --- the ReLU mask of BN -> ReLU -> conv's backward, without materialising y ----------------

if tl is not None:
    def _relu_mask_body(dy_ptr, z_ptr, scale_ptr, shift_ptr, numel, C, BLOCK: tl.constexpr):
        """dy[i] = 0 where (z[i]*scale[c] + shift[c]) rounded to z's dtype is <= 0 (as
        relu(bn(z)) <= 0, the mask autograd's ReLU uses; NaN passes its gradient), for
        channels_last-dense dy and z (channel = flat index % C)."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = offs < numel
        c = offs % C
        z = tl.load(z_ptr + offs, mask=m, other=0.0)
        sc = tl.load(scale_ptr + c, mask=m, other=1.0)
        sh = tl.load(shift_ptr + c, mask=m, other=0.0)
        t = (z.to(tl.float32) * sc + sh).to(z.dtype)
        dy = tl.load(dy_ptr + offs, mask=m, other=0.0)
        out = tl.where(t <= 0.0, 0.0, dy.to(tl.float32)).to(dy.dtype)
        tl.store(dy_ptr + offs, out, mask=m)

_MASK_KERNELS: dict = {}


def _relu_mask_kernel():
    # decorated on first use, so that the interpreter mode is the one current then
    want = _interpret_wanted()
    if want not in _MASK_KERNELS:
        _MASK_KERNELS[want] = triton.jit(_relu_mask_body)
    return _MASK_KERNELS[want]


def relu_mask_(dy: torch.Tensor, z: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor):
    """In place: dy = 0 where relu(z*scale + shift) would be 0 (dy, z channels_last)."""
    cl = torch.channels_last
    if not (dy.is_contiguous(memory_format=cl) and z.is_contiguous(memory_format=cl)):
        raise ValueError("relu_mask_ expects channels_last dy and z")
    numel = dy.numel()
    if numel == 0:
        return dy
    block = 8192 if _interpret_wanted() else 1024
    grid = (triton.cdiv(numel, block),)
    ctx = torch.cuda.device(dy.device) if dy.device.type == "cuda" else contextlib.nullcontext()
    with ctx:
        _relu_mask_kernel()[grid](dy, z, scale.float().contiguous(), shift.float().contiguous(),
                                  numel, dy.shape[1], BLOCK=block)
    return dy


# --- the backward kernels as custom ops ----------------------------------------------------
#
# The block operators' backward formulas are traced by AOTAutograd under torch.compile
# (and by opcheck) with fake tensors, so the Triton calls they make are custom operators
# with fake kernels. (The forward calls need not be: they run inside the block operators,
# which are opaque.)

_custom_op = torch.library.custom_op


def _bn_grad(bn_z, bn_out, bn_mean, bn_a, bn_b, bn_d):
    if bn_z is None:
        return None
    return load_kernels().BNGradPrologue(z=bn_z, out=bn_out, mean=bn_mean, a=bn_a, b=bn_b,
                                         d=bn_d)


@_custom_op("fused_resnet::triton_conv_input_grad", mutates_args=())
def _conv_input_grad_op(grad_out: Tensor, weight: Tensor, input_shape: list[int],
                        stride: list[int], padding: list[int], dilation: list[int], groups: int,
                        bn_z: Optional[Tensor], bn_out: Optional[Tensor],
                        bn_mean: Optional[Tensor], bn_a: Optional[Tensor],
                        bn_b: Optional[Tensor], bn_d: Optional[Tensor]) -> Tensor:
    """conv2d_input_grad (channels_last, grad_out's dtype), with the BN(+ReLU) backward
    folded into its grad_out loads when bn_z is given (BNGradPrologue's fields)."""
    return load_kernels().conv2d_input_grad(
        grad_out, weight, list(input_shape), list(stride), list(padding), list(dilation), groups,
        bn_grad=_bn_grad(bn_z, bn_out, bn_mean, bn_a, bn_b, bn_d))


@_conv_input_grad_op.register_fake
def _(grad_out, weight, input_shape, stride, padding, dilation, groups, bn_z, bn_out, bn_mean,
      bn_a, bn_b, bn_d):
    return grad_out.new_empty(list(input_shape)).contiguous(memory_format=torch.channels_last)


@_custom_op("fused_resnet::triton_conv_weight_grad", mutates_args=())
def _conv_weight_grad_op(x: Tensor, grad_out: Tensor, weight: Tensor, stride: list[int],
                         padding: list[int], dilation: list[int], groups: int,
                         in_scale: Optional[Tensor], in_shift: Optional[Tensor], in_relu: bool,
                         bn_z: Optional[Tensor], bn_out: Optional[Tensor],
                         bn_mean: Optional[Tensor], bn_a: Optional[Tensor],
                         bn_b: Optional[Tensor], bn_d: Optional[Tensor]) -> Tensor:
    """conv2d_weight_grad (fp32 accumulation) returned in weight's dtype and strides, with
    the input prologue relu?(x*in_scale + in_shift) and the folded BN backward."""
    gw = load_kernels().conv2d_weight_grad(
        x, grad_out, list(weight.shape), list(stride), list(padding), list(dilation), groups,
        in_scale=in_scale, in_shift=in_shift, in_relu=in_relu,
        bn_grad=_bn_grad(bn_z, bn_out, bn_mean, bn_a, bn_b, bn_d))
    return torch.empty_like(weight, memory_format=torch.preserve_format).copy_(gw)


@_conv_weight_grad_op.register_fake
def _(x, grad_out, weight, stride, padding, dilation, groups, in_scale, in_shift, in_relu, bn_z,
      bn_out, bn_mean, bn_a, bn_b, bn_d):
    return torch.empty_like(weight, memory_format=torch.preserve_format)


@_custom_op("fused_resnet::triton_relu_mask_", mutates_args=("dy",))
def _relu_mask_op(dy: Tensor, z: Tensor, scale: Tensor, shift: Tensor) -> None:
    """dy = 0 in place where relu(z*scale + shift) (rounded to z's dtype) is 0."""
    relu_mask_(dy, z, scale, shift)


@_relu_mask_op.register_fake
def _(dy, z, scale, shift):
    return None


# --- the backend ----------------------------------------------------------------------------

def _bn_grad_zero_one(c: int, device) -> tuple:
    zeros = torch.zeros(c, dtype=torch.float32, device=device)
    return zeros, torch.ones(c, dtype=torch.float32, device=device)


class TritonBackend(Backend):
    """Block operators whose convolutions run the Triton kernels (see the module
    docstring for what is fused where). float64 — and every case `conv_impl` sends to
    ATen — runs the base-class path (ATen convolutions + the same primitives), so on
    CPU float64 gives exactly the `reference` backend's results."""

    name = "triton"
    stats_guard_ratio: Optional[float] = STATS_GUARD_RATIO

    # -- the kernels --
    @property
    def kernels(self):
        return load_kernels()

    def _kernels_or_none(self):
        try:
            return load_kernels()
        except ImportError:
            return None

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
        k = self._kernels_or_none()
        if k is None:
            return "aten"
        interp = k.is_interpreter()
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
    @staticmethod
    def _prims(t: torch.Tensor) -> Backend:
        inst = backends._instances()
        if t.device.type == "cuda" and backends._has_compiled_kernel("CUDA"):
            return inst["cuda"]
        return inst["reference"]

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

    # -- convolution --
    @staticmethod
    def _geometry(conv) -> tuple:
        return tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation), conv.groups

    def conv(self, x, weight, conv):
        if not self._triton(x, weight, conv, "conv"):
            return super().conv(x, weight, conv)
        return self.kernels.conv2d(x, weight, *self._geometry(conv))

    def _triton_conv_backward(self, grad, x, weight, conv, need_x, need_w, *,
                              bn_grad=(None,) * 6, in_scale=None, in_shift=None, in_relu=False):
        """dx, dw (None where not needed) by the Triton kernels, through the custom ops
        above; bn_grad = (z, out, mean, a, b, d) of a BN backward folded into the loads of
        grad, or Nones."""
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

    # -- batch statistics from the conv epilogue --
    def _epilogue_stats(self, ch_sum, ch_sumsq, z):
        """mean and biased variance from the fp32 sums of the conv epilogue; two-pass
        from z instead when the one-pass variance would cancel (see the module doc)."""
        n = z.numel() // z.shape[1]
        mean = ch_sum / n
        var = (ch_sumsq / n - mean * mean).clamp_min(0)
        ratio = self.stats_guard_ratio
        if ratio is not None and not _capturing(z):
            if bool((mean * mean > ratio * var).any()):
                return self.bn_stats(z)
        return mean, var

    # -- block operators --
    def conv_bn_relu_forward(self, x, weight, conv, bn, relu):
        if _synced(bn) or not self._triton(x, weight, conv, "conv_bn_relu"):
            # sync BN: the base path (Triton conv via self.conv, statistics merged over
            # the ranks by self.stats); ATen layers: the base path altogether
            return super().conv_bn_relu_forward(x, weight, conv, bn, relu)
        k = self.kernels
        if bn.use_batch_stats:
            z, ch_sum, ch_sumsq = k.conv2d(x, weight, *self._geometry(conv), stats=True)
            mean, var = self._epilogue_stats(ch_sum, ch_sumsq, z)
        else:
            z = k.conv2d(x, weight, *self._geometry(conv))
            mean, var = self.stats(z, bn)
        scale, shift = bn.scale_shift(mean, var)
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
        sum_g, sum_g_xmu, _ = self.bn_backward_reduce(grad_out, mask_src, z, mean, None, None)
        a, b, d, grad_gamma, grad_beta = bn.grad_coefficients(z, var, sum_g, sum_g_xmu)
        bn_grad = (z, mask_src, mean, a, b, d)
        dx, dw = self._triton_conv_backward(grad_out, x, weight, conv, need_x, need_w,
                                            bn_grad=bn_grad)
        return dx, dw, grad_gamma, grad_beta

    def bn_relu_conv_forward(self, z, weight, conv, bn, relu):
        if not self._triton(z, weight, conv, "bn_relu_conv"):
            return super().bn_relu_conv_forward(z, weight, conv, bn, relu)
        mean, var = self.stats(z, bn)
        scale, shift = bn.scale_shift(mean, var)
        out = self.kernels.conv2d(z, weight, *self._geometry(conv), in_scale=scale,
                                  in_shift=shift, in_relu=relu)
        return out, mean, var

    def bn_relu_conv_backward(self, grad_out, z, weight, mean, var, conv, bn, relu,
                              need_z, need_w):
        if not self._triton(z, weight, conv, "bn_relu_conv"):
            return super().bn_relu_conv_backward(grad_out, z, weight, mean, var, conv, bn,
                                                 relu, need_z, need_w)
        scale, shift = bn.scale_shift(mean, var)
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
        return self.kernels.conv2d(x, weight, *self._geometry(conv), bias=bias,
                                   residual=residual, out_relu=relu)

    def conv_bias_act_backward(self, grad_out, out, x, weight, conv, relu, need_x, need_w,
                               need_bias, need_residual):
        if not self._triton(x, weight, conv, "conv_bias_act"):
            return super().conv_bias_act_backward(grad_out, out, x, weight, conv, relu, need_x,
                                                  need_w, need_bias, need_residual)
        mask_src = out if relu else None
        c = out.shape[1]
        zeros, ones = _bn_grad_zero_one(c, out.device)
        bn_grad = (None,) * 6
        if relu:   # grad_z = 1*g masked where out <= 0 (+ 0*(z - 0) + 0)
            bn_grad = (out, out, zeros, ones, zeros, zeros)
        dx, dw = self._triton_conv_backward(grad_out, x, weight, conv, need_x, need_w,
                                            bn_grad=bn_grad)
        dbias = dres = None
        if need_bias:
            dbias = self.bn_backward_reduce(grad_out, mask_src, out, zeros, None, None)[0]
        if need_residual:
            dres, _ = self.bn_backward_apply(grad_out, mask_src, out, zeros, ones, zeros, zeros,
                                             None, None, None, None, None, False)
        return dx, dw, dbias, dres


def _synced(bn) -> bool:
    """Sync BN with batch statistics (fused_resnet/distributed.py)."""
    return bool(getattr(bn, "synced", False))


def _capturing(t: torch.Tensor) -> bool:
    return t.device.type == "cuda" and torch.cuda.is_current_stream_capturing()

