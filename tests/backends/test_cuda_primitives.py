"""GPU tests of the CUDA kernels of the four primitives (csrc/cuda/*.cu) against the
plain-PyTorch oracle fused_resnet.backends.primitives.

Every test runs on fresh random inputs (per-channel offsets and scales, never zeros or
ones) and compares with the relative error ||a - b|| / ||b||, the tolerance set by the
dtype: both sides accumulate in acc_t (fp32, fp64 for fp64), so reductions agree to a
few acc_t ulps of their inputs' magnitude, and elementwise outputs to an occasional
1-ulp rounding flip of the output dtype (FMA contraction vs PyTorch's separate mul/add).

Skipped as a whole without a CUDA device or without the CUDA kernels in fused_resnet._C.
"""
from __future__ import annotations

import itertools

import pytest
import torch

try:
    import fused_resnet  # noqa: F401  (loads fused_resnet._C, registers the fake kernels)
    from fused_resnet.backends import primitives as P
except Exception as _err:  # pragma: no cover - depends on the build
    pytest.skip(f"fused_resnet is not importable ({type(_err).__name__}: {_err})",
                allow_module_level=True)


def _cuda_kernels_registered() -> bool:
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key("fused_resnet::bn_stats",
                                                                    "CUDA"))
    except Exception:  # the operator itself is not defined (no fused_resnet._C)
        return False


if not torch.cuda.is_available():
    _SKIP_REASON = "no CUDA device (torch.cuda.is_available() is False)"
elif not _cuda_kernels_registered():
    _SKIP_REASON = ("fused_resnet::bn_stats has no CUDA kernel: fused_resnet._C was built "
                    "without csrc/cuda (build with FUSED_RESNET_CUDA=1 and a CUDA toolkit)")
else:
    _SKIP_REASON = None

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(_SKIP_REASON is not None, reason=_SKIP_REASON or "")]

ops = torch.ops.fused_resnet if hasattr(torch.ops, "fused_resnet") else None

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]
DT_IDS = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
          torch.float64: "fp64"}
# Elementwise outputs (in the dtype of x): a few 1-ulp rounding flips at most.
ELEM_TOL = {torch.bfloat16: 8e-3, torch.float16: 1e-3, torch.float32: 1e-5,
            torch.float64: 1e-12}
# Per-channel reductions (acc_t = fp32, or fp64 for fp64 input).
RED_TOL = {torch.bfloat16: 1e-4, torch.float16: 1e-4, torch.float32: 1e-4,
           torch.float64: 1e-10}

# nchw: contiguous; cl: channels_last; *_off: storage offset of one element (not
# 16-byte aligned: scalar path); strided: neither layout (made contiguous inside).
FORMATS = ["nchw", "cl", "nchw_off", "cl_off", "strided"]

# Odd shapes: C and H*W not multiples of the vector width, 1-sized dims, C = 1, many
# channels with a partial column tile, and vector-friendly ones.
SHAPES = [
    (3, 5, 7, 9),
    (2, 64, 9, 7),
    (4, 24, 13, 11),
    (2, 40, 7, 7),
    (2, 65, 5, 3),
    (3, 16, 12, 12),
    (1, 1, 1, 1),
    (2, 3, 1, 1),
    (5, 1, 4, 6),
    (1, 8, 1, 24),
    (257, 4, 3, 1),
    (2, 2050, 3, 3),
]
SHAPES_SMALL = [(3, 5, 7, 9), (2, 64, 9, 7), (2, 40, 7, 7), (3, 16, 12, 12)]
# Real ResNet-50 layer shapes at a small batch: multiple row splits / column tiles.
SHAPES_RESNET = [(16, 64, 112, 112), (32, 256, 56, 56), (32, 2048, 7, 7), (32, 1024, 14, 14)]


def _shape_id(s):
    return "x".join(map(str, s))


_SEED = [1234]


def _gen() -> torch.Generator:
    _SEED[0] += 1
    g = torch.Generator(device="cuda")
    g.manual_seed(_SEED[0])
    return g


def _cl_strides(shape):
    N, C, H, W = shape
    return (H * W * C, 1, W * C, C)


def to_format(t: torch.Tensor, fmt: str) -> torch.Tensor:
    """A copy of t with the same values in the memory layout `fmt`."""
    if fmt == "nchw":
        return t.contiguous()
    if fmt == "cl":
        return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t.contiguous()
    if fmt in ("nchw_off", "cl_off"):
        buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
        if fmt == "cl_off" and t.dim() == 4:
            v = buf[1:].as_strided(t.shape, _cl_strides(t.shape))
        else:
            v = buf[1:].view(t.shape)
        v.copy_(t)
        return v
    if fmt == "strided":  # every other element of the last dim of a wider tensor
        wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        v = wide[..., ::2]
        v.copy_(t)
        return v
    raise ValueError(fmt)


def rand_act(shape, dtype, fmt="nchw", *, offset=True, g=None) -> torch.Tensor:
    """Random activation: per-channel mean in [-3, 3] and std in [0.5, 2]."""
    g = g or _gen()
    C = shape[1]
    x = torch.randn(shape, generator=g, device="cuda", dtype=torch.float32)
    if offset:
        pc = (1, C) + (1,) * (len(shape) - 2)
        std = torch.rand(C, generator=g, device="cuda") * 1.5 + 0.5
        mean = torch.rand(C, generator=g, device="cuda") * 6 - 3
        x = x * std.view(pc) + mean.view(pc)
    return to_format(x.to(dtype), fmt)


def rand_vec(C, dtype, *, positive=False, g=None) -> torch.Tensor:
    g = g or _gen()
    acc = P.acc_dtype(dtype)
    v = torch.randn(C, generator=g, device="cuda", dtype=torch.float64)
    if positive:
        v = v.abs() + 0.1
    return v.to(acc)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if b.numel() == 0:
        return 0.0
    num = (a - b).norm().item()
    den = b.norm().item()
    return num / den if den > 0 else num


def assert_close_rel(a, b, tol, what=""):
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    assert a.dtype == b.dtype, f"{what}: dtype {a.dtype} != {b.dtype}"
    assert a.device == b.device, f"{what}: device {a.device} != {b.device}"
    assert torch.isfinite(a).all() == torch.isfinite(b).all(), f"{what}: non-finite values"
    e = rel_err(a, b)
    assert e <= tol, f"{what}: relative error {e:.3e} > {tol:.1e}"


def assert_same_layout(out, ref, what=""):
    """Same memory format as the reference (strides of the non-1 dims)."""
    if out.numel() == 0:
        return
    for fmt in (torch.contiguous_format, torch.channels_last):
        if ref.dim() == 4 or fmt == torch.contiguous_format:
            assert out.is_contiguous(memory_format=fmt) == ref.is_contiguous(memory_format=fmt), (
                f"{what}: memory format differs (out strides {out.stride()}, "
                f"reference {ref.stride()})")


def _combos(n):
    return list(itertools.product([False, True], repeat=n))


# ------------------------------------------------------------------------------ bn_stats

def _check_stats(x):
    mean, var = ops.bn_stats(x)
    rmean, rvar = P.bn_stats(x)
    tol = RED_TOL[x.dtype]
    assert_close_rel(mean, rmean, tol, "mean")
    assert_close_rel(var, rvar, tol, "var")


@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
def test_bn_stats(dtype, fmt, shape):
    _check_stats(rand_act(shape, dtype, fmt))


@pytest.mark.parametrize("shape", [(33, 24), (7, 5), (4, 8, 17), (3, 3, 64)], ids=_shape_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
def test_bn_stats_2d_3d(dtype, shape):
    _check_stats(rand_act(shape, dtype, "nchw"))
    _check_stats(rand_act(shape, dtype, "nchw_off"))


@pytest.mark.parametrize("shape", SHAPES_RESNET, ids=_shape_id)
@pytest.mark.parametrize("fmt", ["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=DT_IDS.get)
def test_bn_stats_resnet_shapes(dtype, fmt, shape):
    _check_stats(rand_act(shape, dtype, fmt))


@pytest.mark.parametrize("fmt", ["nchw", "cl"])
def test_bn_stats_large_mean_is_stable(fmt):
    """|mean| / std = 1e4 over 2.6M values per channel: sum/sum-of-squares in fp32 would
    lose every digit of the variance; Welford + Chan merges keep it to ~1e-4."""
    g = _gen()
    shape = (64, 8, 64, 640)
    x = torch.randn(shape, generator=g, device="cuda", dtype=torch.float64) * 0.1 + 1000.0
    x32 = to_format(x.float(), fmt)
    mean, var = ops.bn_stats(x32)
    rmean, rvar = P.bn_stats(x32.double())  # fp64 oracle on the same fp32 values
    assert_close_rel(mean.double(), rmean, 1e-6, "mean")
    assert_close_rel(var.double(), rvar, 1e-3, "var")


def test_empty_elementwise():
    x = torch.randn(0, 4, 3, 3, device="cuda")
    v = torch.randn(4, device="cuda")
    out = ops.bn_apply(x, v, v, x, x, v, v, True)
    assert out.shape == x.shape and out.dtype == x.dtype
    gx, gs = ops.bn_backward_apply(x, x, x, v, v, v, v, None, None, None, None, None, True)
    assert gx.shape == x.shape and gs.shape == x.shape
    gx, gs = ops.bn_backward_apply(x, x, x, v, v, v, v, None, None, None, None, None, False)
    assert gx.shape == x.shape and gs.shape == (0,)


def test_bn_stats_empty():
    for shape in [(0, 4, 3, 3), (2, 4, 0, 3)]:
        x = torch.randn(shape, device="cuda")
        mean, var = ops.bn_stats(x)
        rmean, rvar = P.bn_stats(x)
        torch.testing.assert_close(mean, rmean, equal_nan=True)
        torch.testing.assert_close(var, rvar, equal_nan=True)
    mean, var = ops.bn_stats(torch.randn(2, 0, 3, 3, device="cuda"))
    assert mean.shape == (0,) and var.shape == (0,)


# ------------------------------------------------------------------------------ bn_apply

def _apply_args(x, residual, proj, relu, fmt_other=None):
    C = x.shape[1]
    fo = fmt_other or "nchw"
    res = rand_act(tuple(x.shape), x.dtype, fo) if residual else None
    if proj:
        x2 = rand_act(tuple(x.shape), x.dtype, fo)
        sc2, sh2 = rand_vec(C, x.dtype), rand_vec(C, x.dtype)
    else:
        x2 = sc2 = sh2 = None
    return (x, rand_vec(C, x.dtype), rand_vec(C, x.dtype), res, x2, sc2, sh2, relu)


def _check_apply(args):
    out = ops.bn_apply(*args)
    ref = P.bn_apply(*args)
    assert_close_rel(out, ref, ELEM_TOL[args[0].dtype], "out")
    assert_same_layout(out, ref, "out")


@pytest.mark.parametrize("residual,proj,relu", _combos(3))
@pytest.mark.parametrize("shape", SHAPES_SMALL + [(2, 65, 5, 3), (1, 1, 1, 1), (2, 2050, 3, 3)],
                         ids=_shape_id)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
def test_bn_apply(dtype, fmt, shape, residual, proj, relu):
    x = rand_act(shape, dtype, fmt)
    # residual / x2 in the same layout as x (fast path), except for the offset formats,
    # where they keep their own (aligned) layout.
    other = fmt if fmt in ("nchw", "cl") else "nchw"
    _check_apply(_apply_args(x, residual, proj, relu, other))


@pytest.mark.parametrize("xfmt,ofmt", [("cl", "nchw"), ("nchw", "cl"), ("cl", "cl_off"),
                                       ("nchw", "strided")])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=DT_IDS.get)
def test_bn_apply_mixed_formats(dtype, xfmt, ofmt):
    x = rand_act((3, 24, 5, 7), dtype, xfmt)
    _check_apply(_apply_args(x, True, True, True, ofmt))


@pytest.mark.parametrize("shape", [(33, 24), (4, 8, 17)], ids=_shape_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
def test_bn_apply_2d_3d(dtype, shape):
    x = rand_act(shape, dtype, "nchw")
    _check_apply(_apply_args(x, True, True, True))


@pytest.mark.parametrize("shape", SHAPES_RESNET, ids=_shape_id)
@pytest.mark.parametrize("fmt", ["nchw", "cl"])
def test_bn_apply_resnet_shapes(fmt, shape):
    x = rand_act(shape, torch.bfloat16, fmt)
    _check_apply(_apply_args(x, True, False, True, fmt))
    _check_apply(_apply_args(x, False, True, True, fmt))


def test_bn_apply_per_channel_vectors_any_float_dtype():
    """Per-channel vectors of another floating dtype are converted to acc_t."""
    x = rand_act((2, 16, 4, 4), torch.bfloat16, "cl")
    sc, sh = rand_vec(16, torch.float64), rand_vec(16, torch.float64)
    out = ops.bn_apply(x, sc, sh, None, None, None, None, True)
    ref = P.bn_apply(x, sc.float(), sh.float(), None, None, None, None, True)
    assert_close_rel(out, ref, ELEM_TOL[torch.bfloat16], "out")


# -------------------------------------------------------------------- bn_backward_reduce

def _reduce_args(x, with_out, with_x2, fmt_other="nchw"):
    C = x.shape[1]
    go = rand_act(tuple(x.shape), x.dtype, fmt_other, offset=False)
    out = rand_act(tuple(x.shape), x.dtype, fmt_other, offset=False) if with_out else None
    mean = rand_vec(C, x.dtype)
    if with_x2:
        x2 = rand_act(tuple(x.shape), x.dtype, fmt_other)
        mean2 = rand_vec(C, x.dtype)
    else:
        x2 = mean2 = None
    return (go, out, x, mean, x2, mean2)


def _check_reduce(args):
    res = ops.bn_backward_reduce(*args)
    ref = P.bn_backward_reduce(*args)
    tol = RED_TOL[args[2].dtype]
    for name, a, b in zip(["sum_g", "sum_g_xmu", "sum_g_xmu2"], res, ref):
        assert_close_rel(a, b, tol, name)


@pytest.mark.parametrize("with_out,with_x2", _combos(2))
@pytest.mark.parametrize("shape", SHAPES_SMALL + [(2, 65, 5, 3), (1, 1, 1, 1), (257, 4, 3, 1),
                                                  (2, 2050, 3, 3)], ids=_shape_id)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
def test_bn_backward_reduce(dtype, fmt, shape, with_out, with_x2):
    x = rand_act(shape, dtype, fmt)
    other = fmt if fmt in ("nchw", "cl") else "nchw"
    _check_reduce(_reduce_args(x, with_out, with_x2, other))


@pytest.mark.parametrize("shape", SHAPES_RESNET, ids=_shape_id)
@pytest.mark.parametrize("fmt", ["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=DT_IDS.get)
def test_bn_backward_reduce_resnet_shapes(dtype, fmt, shape):
    x = rand_act(shape, dtype, fmt)
    _check_reduce(_reduce_args(x, True, dtype == torch.bfloat16, fmt))


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
def test_bn_backward_reduce_mixed_and_2d(dtype):
    x = rand_act((3, 24, 5, 7), dtype, "cl")
    _check_reduce(_reduce_args(x, True, True, "nchw"))
    x = rand_act((33, 24), dtype, "nchw")
    _check_reduce(_reduce_args(x, True, True, "nchw"))


def test_bn_backward_reduce_empty():
    x = torch.randn(0, 4, 3, 3, device="cuda")
    res = ops.bn_backward_reduce(x, x, x, torch.randn(4, device="cuda"), None, None)
    ref = P.bn_backward_reduce(x, x, x, torch.randn(4, device="cuda"), None, None)
    for a, b in zip(res, ref):
        torch.testing.assert_close(a, b)


# --------------------------------------------------------------------- bn_backward_apply

def _bwd_apply_args(x, with_out, with_x2, grad_residual, fmt_other="nchw"):
    C = x.shape[1]
    go = rand_act(tuple(x.shape), x.dtype, fmt_other, offset=False)
    out = rand_act(tuple(x.shape), x.dtype, fmt_other, offset=False) if with_out else None
    vecs = [rand_vec(C, x.dtype) for _ in range(4)]  # mean, a, b, d
    if with_x2:
        x2 = rand_act(tuple(x.shape), x.dtype, fmt_other)
        vecs2 = [rand_vec(C, x.dtype) for _ in range(4)]
    else:
        x2, vecs2 = None, [None] * 4
    return (go, out, x, *vecs, x2, *vecs2, grad_residual)


def _check_bwd_apply(args):
    gx, gs = ops.bn_backward_apply(*args)
    rgx, rgs = P.bn_backward_apply(*args)
    tol = ELEM_TOL[args[2].dtype]
    assert_close_rel(gx, rgx, tol, "grad_x")
    assert_same_layout(gx, rgx, "grad_x")
    assert_close_rel(gs, rgs, tol, "grad_shortcut")
    assert_same_layout(gs, rgs, "grad_shortcut")


@pytest.mark.parametrize("with_out,with_x2,grad_residual", _combos(3))
@pytest.mark.parametrize("shape", SHAPES_SMALL + [(2, 65, 5, 3), (1, 1, 1, 1), (2, 2050, 3, 3)],
                         ids=_shape_id)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
def test_bn_backward_apply(dtype, fmt, shape, with_out, with_x2, grad_residual):
    x = rand_act(shape, dtype, fmt)
    other = fmt if fmt in ("nchw", "cl") else "nchw"
    _check_bwd_apply(_bwd_apply_args(x, with_out, with_x2, grad_residual, other))


@pytest.mark.parametrize("shape", SHAPES_RESNET, ids=_shape_id)
@pytest.mark.parametrize("fmt", ["nchw", "cl"])
def test_bn_backward_apply_resnet_shapes(fmt, shape):
    x = rand_act(shape, torch.bfloat16, fmt)
    _check_bwd_apply(_bwd_apply_args(x, True, True, False, fmt))
    _check_bwd_apply(_bwd_apply_args(x, True, False, True, fmt))


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
def test_bn_backward_apply_mixed_and_2d(dtype):
    x = rand_act((3, 24, 5, 7), dtype, "cl")
    _check_bwd_apply(_bwd_apply_args(x, True, True, False, "nchw"))
    x = rand_act((4, 8, 17), dtype, "nchw")
    _check_bwd_apply(_bwd_apply_args(x, True, False, True, "nchw"))


# ------------------------------------------- end to end: BN(train) + ReLU backward vs autograd

@pytest.mark.parametrize("fmt", ["nchw", "cl"])
def test_bn_relu_backward_matches_autograd(fmt):
    """grad_x of relu(batch_norm(x)) (training mode) through bn_backward_reduce + apply
    with a = w*invstd, b = -w*invstd^3*sum_g_xmu/n, d = -w*invstd*sum_g/n."""
    eps = 1e-5
    x = rand_act((8, 32, 9, 11), torch.float32, fmt).requires_grad_(True)
    C = x.shape[1]
    w = rand_vec(C, torch.float32, positive=True)
    bias = rand_vec(C, torch.float32)
    y = torch.relu(torch.nn.functional.batch_norm(x, None, None, w, bias, training=True, eps=eps))
    go = rand_act(tuple(x.shape), torch.float32, fmt, offset=False)
    (gx_ref,) = torch.autograd.grad(y, x, go)

    xd = x.detach()
    mean, var = ops.bn_stats(xd)
    invstd = torch.rsqrt(var + eps)
    out = ops.bn_apply(xd, w * invstd, bias - mean * w * invstd, None, None, None, None, True)
    assert_close_rel(out, y.detach(), 1e-5, "bn_apply vs relu(batch_norm)")
    out = y.detach()  # the ReLU mask of autograd itself (no sign flips of values near 0)
    sum_g, sum_gx, _ = ops.bn_backward_reduce(go, out, xd, mean, None, None)
    n = xd.numel() // C
    a = w * invstd
    b = -w * invstd.pow(3) * sum_gx / n
    d = -w * invstd * sum_g / n
    gx, gs = ops.bn_backward_apply(go, out, xd, mean, a, b, d, None, None, None, None, None,
                                   False)
    assert gs.numel() == 0
    assert_close_rel(gx, gx_ref, 1e-4, "grad_x vs autograd")


# --------------------------------------------------------------------------- opcheck

@pytest.mark.parametrize("dtype,fmt", [(torch.bfloat16, "cl"), (torch.float32, "nchw"),
                                       (torch.float16, "nchw_off"), (torch.float64, "cl")],
                         ids=["bf16-cl", "fp32-nchw", "fp16-nchw_off", "fp64-cl"])
def test_opcheck(dtype, fmt):
    from torch.library import opcheck
    x = rand_act((2, 16, 5, 6), dtype, fmt)
    opcheck(ops.bn_stats, (x,))
    for residual, proj, relu in [(False, False, False), (True, False, True), (True, True, True),
                                 (False, True, False)]:
        opcheck(ops.bn_apply, _apply_args(x, residual, proj, relu, "nchw"))
    for with_out, with_x2 in _combos(2):
        opcheck(ops.bn_backward_reduce, _reduce_args(x, with_out, with_x2))
    for with_out, with_x2, grad_residual in [(False, False, False), (True, False, True),
                                             (True, True, False), (False, True, True)]:
        opcheck(ops.bn_backward_apply, _bwd_apply_args(x, with_out, with_x2, grad_residual))


# --------------------------------------------------------------- streams and CUDA graphs

def test_runs_on_current_stream():
    x = rand_act((8, 64, 14, 14), torch.bfloat16, "cl")
    args = _apply_args(x, True, False, True, "cl")
    ref = P.bn_apply(*args)
    rmean, rvar = P.bn_stats(x)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            out = ops.bn_apply(*args)
            mean, var = ops.bn_stats(x)
    torch.cuda.current_stream().wait_stream(s)
    assert_close_rel(out, ref, ELEM_TOL[torch.bfloat16], "out on a side stream")
    assert_close_rel(mean, rmean, RED_TOL[torch.bfloat16], "mean on a side stream")
    assert_close_rel(var, rvar, RED_TOL[torch.bfloat16], "var on a side stream")


def test_cuda_graph_capture():
    x = rand_act((8, 64, 14, 14), torch.bfloat16, "cl")
    go = rand_act((8, 64, 14, 14), torch.bfloat16, "cl", offset=False)
    sc, sh = rand_vec(64, torch.bfloat16), rand_vec(64, torch.bfloat16)

    def step():
        mean, var = ops.bn_stats(x)
        out = ops.bn_apply(x, sc, sh, None, None, None, None, True)
        sums = ops.bn_backward_reduce(go, out, x, mean, None, None)
        gx, _ = ops.bn_backward_apply(go, out, x, mean, sc, sums[0], sums[1], None, None, None,
                                      None, None, False)
        return mean, var, out, gx

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    x.copy_(rand_act((8, 64, 14, 14), torch.bfloat16, "cl"))  # new values, same buffers
    graph.replay()
    torch.cuda.synchronize()
    expected = step()
    for a, b, name in zip(captured, expected, ["mean", "var", "out", "grad_x"]):
        assert_close_rel(a, b, 1e-6, f"{name} (graph replay vs eager)")


# ------------------------------------------------------------------------- argument errors

def test_errors():
    x = rand_act((2, 8, 3, 3), torch.float32, "cl")
    sc, sh = rand_vec(8, torch.float32), rand_vec(8, torch.float32)
    with pytest.raises(RuntimeError, match="device"):
        ops.bn_apply(x, sc.cpu(), sh, None, None, None, None, False)
    with pytest.raises(RuntimeError, match="CUDA tensor"):
        ops.bn_backward_reduce(x.cpu(), None, x.cpu(), sc, None, None)
    with pytest.raises(RuntimeError, match="dtype"):
        ops.bn_apply(x, sc, sh, x.double(), None, None, None, False)
    with pytest.raises(RuntimeError, match="shape"):
        ops.bn_apply(x, sc, sh, x[:1], None, None, None, False)
    with pytest.raises(RuntimeError, match="per-channel"):
        ops.bn_apply(x, sc[:4], sh, None, None, None, None, False)
    with pytest.raises(RuntimeError, match="scale2 is required"):
        ops.bn_apply(x, sc, sh, None, x, None, sh, False)
    with pytest.raises(RuntimeError, match="x2 is None"):
        ops.bn_apply(x, sc, sh, None, None, sc, sh, False)
    with pytest.raises(RuntimeError, match="mean2 is required"):
        ops.bn_backward_reduce(x, None, x, sc, x, None)
    with pytest.raises(RuntimeError, match="dtype"):
        ops.bn_stats(x.int())
    with pytest.raises(RuntimeError, match="4-D"):
        ops.bn_stats(torch.randn(16, device="cuda"))
    with pytest.raises(RuntimeError, match="shape"):
        ops.bn_backward_apply(x[:1], None, x, sc, sc, sc, sc, None, None, None, None, None, False)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_second_device():
    x = rand_act((2, 8, 3, 3), torch.bfloat16, "cl").to("cuda:1")
    sc, sh = rand_vec(8, torch.bfloat16).to("cuda:1"), rand_vec(8, torch.bfloat16).to("cuda:1")
    with torch.cuda.device(0):
        out = ops.bn_apply(x, sc, sh, None, None, None, None, True)
        mean, var = ops.bn_stats(x)
    assert out.device == x.device and mean.device == x.device
    assert_close_rel(out, P.bn_apply(x, sc, sh, None, None, None, None, True),
                     ELEM_TOL[torch.bfloat16], "out on cuda:1")
    with pytest.raises(RuntimeError, match="same CUDA device"):
        ops.bn_apply(x, sc.to("cuda:0"), sh, None, None, None, None, True)


# ----------------------------------------------------------- more than 2^31 elements

_BIG_SHAPE = (2, 64, 4097, 4097)  # 2,148,532,352 elements (> 2^31), 4.3 GB in bf16


def _free_gib() -> float:
    if not torch.cuda.is_available():
        return 0.0
    free, _total = torch.cuda.mem_get_info()
    return free / 2**30


def _chunks(x, rows=512):
    """(n, h0, h1) slices of x over N and H, each a few hundred MB in fp64."""
    N, _, H, _ = x.shape
    for n in range(N):
        for h0 in range(0, H, rows):
            yield n, h0, min(H, h0 + rows)


@pytest.mark.slow
@pytest.mark.skipif(_SKIP_REASON is None and _free_gib() < 16,
                    reason="needs 16 GiB of free GPU memory")
@pytest.mark.parametrize("fmt", ["cl", "nchw"])
def test_more_than_2pow31_elements(fmt):
    """int64 indexing: every op on a bf16 tensor of 2^31 + 1M elements, checked chunk by
    chunk (the last chunks lie beyond element 2^31) against the oracle."""
    N, C, H, W = _BIG_SHAPE
    assert N * C * H * W > 2**31
    g = _gen()
    mf = torch.channels_last if fmt == "cl" else torch.contiguous_format
    x = torch.empty(_BIG_SHAPE, dtype=torch.bfloat16, device="cuda", memory_format=mf)
    x.normal_(generator=g)
    x.add_((torch.rand(C, generator=g, device="cuda") * 4 - 2).view(1, C, 1, 1).bfloat16())

    # bn_stats vs a chunked fp64 two-pass oracle.
    mean, var = ops.bn_stats(x)
    s = torch.zeros(C, dtype=torch.float64, device="cuda")
    for n, h0, h1 in _chunks(x):
        s += x[n, :, h0:h1].double().sum(dim=(1, 2))
    cnt = N * H * W
    rmean = s / cnt
    q = torch.zeros(C, dtype=torch.float64, device="cuda")
    for n, h0, h1 in _chunks(x):
        q += (x[n, :, h0:h1].double() - rmean.view(C, 1, 1)).square().sum(dim=(1, 2))
    rvar = q / cnt
    assert_close_rel(mean.double(), rmean, 1e-5, "mean")
    assert_close_rel(var.double(), rvar, 1e-5, "var")

    # bn_apply (scale, shift, ReLU) vs the oracle on each chunk.
    sc, sh = rand_vec(C, torch.bfloat16), rand_vec(C, torch.bfloat16)
    out = ops.bn_apply(x, sc, sh, None, None, None, None, True)
    assert out.is_contiguous(memory_format=mf)
    for n, h0, h1 in _chunks(x):
        ref = P.bn_apply(x[n:n + 1, :, h0:h1], sc, sh, None, None, None, None, True)
        torch.testing.assert_close(out[n:n + 1, :, h0:h1], ref, rtol=1.6e-2, atol=1e-2)
    del out, ref

    # bn_backward_reduce with grad_out = x (saves memory): sum x, sum x*(x - mean).
    sum_g, sum_gx, sum_gx2 = ops.bn_backward_reduce(x, None, x, mean, None, None)
    rs = torch.zeros(C, dtype=torch.float64, device="cuda")
    rsx = torch.zeros(C, dtype=torch.float64, device="cuda")
    for n, h0, h1 in _chunks(x):
        xc = x[n, :, h0:h1].double()
        rs += xc.sum(dim=(1, 2))
        rsx += (xc * (xc - mean.double().view(C, 1, 1))).sum(dim=(1, 2))
    assert sum_gx2.numel() == 0
    assert_close_rel(sum_g.double(), rs, 1e-4, "sum_g")
    assert_close_rel(sum_gx.double(), rsx, 1e-4, "sum_g_xmu")

    # bn_backward_apply with grad_out = x.
    a, b, d = rand_vec(C, torch.bfloat16), rand_vec(C, torch.bfloat16), rand_vec(C, torch.bfloat16)
    gx, gs = ops.bn_backward_apply(x, None, x, mean, a, b, d, None, None, None, None, None, False)
    assert gs.numel() == 0 and gx.is_contiguous(memory_format=mf)
    for n, h0, h1 in _chunks(x):
        xc = x[n:n + 1, :, h0:h1]
        ref, _ = P.bn_backward_apply(xc, None, xc, mean, a, b, d, None, None, None, None, None,
                                     False)
        torch.testing.assert_close(gx[n:n + 1, :, h0:h1], ref, rtol=1.6e-2, atol=2e-2)
    del gx, x
    torch.cuda.empty_cache()
