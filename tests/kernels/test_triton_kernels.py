"""Triton implicit-GEMM conv kernels (fused_resnet/kernels/conv.py) against PyTorch float64 oracles.

Without CUDA the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set by
tests/conftest.py before fused_resnet is imported) on tiny odd shapes (H, W, C not
multiples of any tile), in fp32 and fp16.  The GPU section (skipped without CUDA) repeats the checks in bf16 at
ResNet-like sizes.

Tolerances (relative error ||a - b|| / ||b|| against float64 on the same rounded inputs):
* fp32: fp32 products and accumulation over K <= ~150 terms: ~1e-7 observed; 2e-5 allowed.
  On a GPU with TF32 (torch.backends.cudnn.allow_tf32, the default) 1e-2.
* fp16: inputs are exact in the oracle; the kernel rounds the prologue output x' and the
  output to fp16 (unit roundoff 2^-11 = 4.9e-4 each): 4e-3 allowed.
* bf16 (GPU only): unit roundoff 2^-8 = 3.9e-3 for the same two roundings: 3e-2 allowed.
"""
import pytest
import torch
import torch.nn.functional as F

import fused_resnet.kernels as kernels

CUDA = torch.cuda.is_available()
if not kernels.AVAILABLE:
    pytest.skip(f"triton is unusable here: {kernels.IMPORT_ERROR}", allow_module_level=True)
if not CUDA and not kernels.is_interpreter():
    pytest.skip("no CUDA, and the kernels were imported without TRITON_INTERPRET=1 "
                "(tests/conftest.py sets it)", allow_module_level=True)
K = kernels.conv

DEV = "cuda" if CUDA else "cpu"
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def tol(dtype):
    if dtype == torch.float32 and CUDA and torch.backends.cudnn.allow_tf32:
        return 1e-2
    return TOL[dtype]


def rel(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm()).item()


def cl(t):
    return t.contiguous(memory_format=torch.channels_last)


def randn(*shape, dtype=torch.float32, gen=None):
    return torch.randn(*shape, generator=gen, dtype=torch.float32).to(device=DEV, dtype=dtype)


def pc(v):
    return v.double()[None, :, None, None]


def prologue_ref(x, scale, shift, relu):
    xr = x.double()
    if scale is not None:
        xr = xr * pc(scale)
    if shift is not None:
        xr = xr + pc(shift)
    return xr.clamp_min(0) if relu else xr


# Geometries: (name, N, Cin, Cout, H, W, (KH, KW), stride, padding, dilation, groups).
# Cin_g < 16 takes the flattened-K path of the forward / flattened-N path of wgrad,
# Cin_g >= 16 the per-tap channel-chunk path; both appear with odd sizes.
GEOMS = [
    ("3x3_s1", 2, 5, 7, 7, 5, (3, 3), 1, 1, 1, 1),
    ("3x3_s2", 2, 5, 7, 7, 5, (3, 3), 2, 1, 1, 1),
    ("1x1_s1_c20", 2, 20, 24, 5, 3, (1, 1), 1, 0, 1, 1),
    ("1x1_s2_c20", 2, 20, 18, 7, 5, (1, 1), 2, 0, 1, 1),
    ("3x3_s2_c18", 1, 18, 17, 7, 6, (3, 3), 2, 1, 1, 1),
    ("3x3_dil2_c17", 1, 17, 9, 7, 6, (3, 3), 1, 2, 2, 1),
    ("3x3_dil2_flat", 2, 5, 7, 7, 5, (3, 3), 1, 2, 2, 1),
    ("3x3_g2", 2, 6, 8, 7, 5, (3, 3), 1, 1, 1, 2),
    ("3x3_g2_s2_c36", 1, 36, 34, 5, 5, (3, 3), 2, 1, 1, 2),
    ("3x3_depthwise", 2, 4, 8, 6, 5, (3, 3), 1, 1, 1, 4),
    ("stem_7x7_s2", 1, 3, 8, 11, 9, (7, 7), 2, 3, 1, 1),
    ("3x1_rect", 2, 5, 7, 6, 7, (3, 1), (1, 2), (1, 0), 1, 1),
]
GEOM_IDS = [g[0] for g in GEOMS]


def make_case(geom, dtype, seed):
    _, N, Cin, Cout, H, W, (KH, KW), s, p, d, g = geom
    gen = torch.Generator().manual_seed(seed)
    x = cl(randn(N, Cin, H, W, dtype=dtype, gen=gen))
    w = (randn(Cout, Cin // g, KH, KW, gen=gen) / (Cin // g * KH * KW) ** 0.5).to(dtype)
    scale = (torch.rand(Cin, generator=gen) + 0.5).to(DEV)
    shift = (torch.rand(Cin, generator=gen) * 0.5 + 0.1).to(DEV)   # > 0: padding order matters
    return x, w, scale, shift, (s, p, d, g)


# ---------------------------------------------------------------------------- forward

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("geom", GEOMS, ids=GEOM_IDS)
def test_forward_prologue_stats(geom, dtype):
    """Train-mode forward: normalise+ReLU prologue and the batch-statistics epilogue."""
    x, w, scale, shift, (s, p, d, g) = make_case(geom, dtype, 1)
    out, mean, var = K.conv2d(x, w, s, p, d, g, in_scale=scale, in_shift=shift,
                              in_relu=True, stats=True)
    xr = prologue_ref(x, scale, shift, True)
    ref = F.conv2d(xr, w.double(), None, s, p, d, g)
    assert out.dtype == dtype and out.shape == ref.shape
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert mean.dtype == torch.float32 and var.dtype == torch.float32
    assert rel(out, ref) < tol(dtype)
    assert rel(mean, ref.mean((0, 2, 3))) < tol(dtype)
    assert rel(var, ref.var((0, 2, 3), unbiased=False)) < tol(dtype)
    pads = (p, p) if isinstance(p, int) else p
    if max(pads) > 0:
        # the test can tell "activate, then zero-pad" from "zero-pad, then activate"
        xp = F.pad(x.double(), (pads[1], pads[1], pads[0], pads[0]))
        wrong = F.conv2d(prologue_ref(xp, scale, shift, True), w.double(), None, s, 0, d, g)
        assert rel(wrong, ref) > 20 * tol(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("geom", [GEOMS[i] for i in (0, 3, 4, 7, 10)],
                         ids=[GEOM_IDS[i] for i in (0, 3, 4, 7, 10)])
def test_forward_eval_epilogue(geom, dtype):
    """Eval-mode forward: bias + residual + ReLU epilogue (folded BN)."""
    x, w, _, _, (s, p, d, g) = make_case(geom, dtype, 2)
    ref0 = F.conv2d(x.double(), w.double(), None, s, p, d, g)
    gen = torch.Generator().manual_seed(3)
    bias = torch.randn(w.shape[0], generator=gen).to(DEV)
    res = cl(torch.randn(ref0.shape, generator=gen).to(DEV, dtype))
    out = K.conv2d(x, w, s, p, d, g, bias=bias, residual=res, out_relu=True)
    ref = (ref0 + pc(bias) + res.double()).clamp_min(0)
    assert out.dtype == dtype
    assert rel(out, ref) < tol(dtype)
    # plain conv, and bias alone without relu
    assert rel(K.conv2d(x, w, s, p, d, g), ref0) < tol(dtype)
    assert rel(K.conv2d(x, w, s, p, d, g, bias=bias), ref0 + pc(bias)) < tol(dtype)


def test_forward_all_fusions_together_and_partial_prologue():
    x, w, scale, shift, (s, p, d, g) = make_case(GEOMS[1], torch.float32, 4)
    ref_conv = F.conv2d(prologue_ref(x, scale, None, False), w.double(), None, s, p, d, g)
    bias = torch.randn(w.shape[0]).to(DEV)
    res = cl(torch.randn(ref_conv.shape).to(DEV))
    out, mean, var = K.conv2d(x, w, s, p, d, g, in_scale=scale, bias=bias, residual=res,
                              out_relu=True, stats=True)
    assert rel(out, (ref_conv + pc(bias) + res.double()).clamp_min(0)) < 2e-5
    # stats are of the raw conv output (before bias / residual / relu)
    assert rel(mean, ref_conv.mean((0, 2, 3))) < 2e-5
    assert rel(var, ref_conv.var((0, 2, 3), unbiased=False)) < 2e-5
    # relu-only prologue, shift-only prologue
    r1 = F.conv2d(x.double().clamp_min(0), w.double(), None, s, p, d, g)
    assert rel(K.conv2d(x, w, s, p, d, g, in_relu=True), r1) < 2e-5
    r2 = F.conv2d(prologue_ref(x, None, shift, False), w.double(), None, s, p, d, g)
    assert rel(K.conv2d(x, w, s, p, d, g, in_shift=shift), r2) < 2e-5


def test_forward_accepts_nchw_and_any_weight_layout():
    x, w, _, _, (s, p, d, g) = make_case(GEOMS[0], torch.float32, 5)
    ref = F.conv2d(x.double(), w.double(), None, s, p, d, g)
    out = K.conv2d(x.contiguous(), cl(w), s, p, d, g)        # NCHW input, NHWC weight
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert rel(out, ref) < 2e-5


def test_forward_empty_batch():
    x, w, _, _, (s, p, d, g) = make_case(GEOMS[0], torch.float32, 6)
    out, mean, var = K.conv2d(x[:0], w, s, p, d, g, stats=True)
    assert out.shape == (0, 7, 7, 5) and mean.abs().sum() == 0 and var.shape == (7,)


# ---------------------------------------------------------------------- input gradient

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("geom", GEOMS, ids=GEOM_IDS)
def test_input_grad(geom, dtype):
    x, w, _, _, (s, p, d, g) = make_case(geom, dtype, 7)
    out_shape = F.conv2d(x.double(), w.double(), None, s, p, d, g).shape
    go = cl(torch.randn(out_shape, generator=torch.Generator().manual_seed(8)).to(DEV, dtype))
    gi = K.conv2d_input_grad(go, w, x.shape, s, p, d, g)
    ref = torch.nn.grad.conv2d_input(x.shape, w.double(), go.double(), s, p, d, g)
    assert gi.dtype == dtype and gi.shape == x.shape
    assert gi.is_contiguous(memory_format=torch.channels_last)
    assert rel(gi, ref) < tol(dtype)


def test_input_grad_uncovered_pixels_are_zero():
    """Stride 2 on an even input with a 1x1 kernel: odd rows/cols get exactly 0 (written
    by the phases with no contributing tap; the output buffer starts uninitialised)."""
    x = cl(randn(2, 20, 6, 6))
    w = randn(16, 20, 1, 1)
    go = cl(randn(2, 16, 3, 3))
    gi = K.conv2d_input_grad(go, w, x.shape, 2, 0, 1, 1)
    assert torch.all(gi[:, :, 1::2, :] == 0) and torch.all(gi[:, :, :, 1::2] == 0)
    ref = torch.nn.grad.conv2d_input(x.shape, w.double(), go.double(), 2, 0, 1, 1)
    assert rel(gi, ref) < 2e-5


# --------------------------------------------------------------------- weight gradient

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("geom", GEOMS, ids=GEOM_IDS)
def test_weight_grad_prologue(geom, dtype):
    x, w, scale, shift, (s, p, d, g) = make_case(geom, dtype, 9)
    xr = prologue_ref(x, scale, shift, True)
    out_shape = F.conv2d(xr, w.double(), None, s, p, d, g).shape
    go = cl(torch.randn(out_shape, generator=torch.Generator().manual_seed(10)).to(DEV, dtype))
    gw = K.conv2d_weight_grad(x, go, w.shape, s, p, d, g, in_scale=scale, in_shift=shift,
                              in_relu=True)
    ref = torch.nn.grad.conv2d_weight(xr, w.shape, go.double(), s, p, d, g)
    assert gw.dtype == torch.float32 and gw.shape == w.shape
    assert rel(gw, ref) < tol(dtype)


@pytest.mark.parametrize("split_k", [1, 3])
def test_weight_grad_plain_and_split_k(split_k):
    x, w, _, _, (s, p, d, g) = make_case(GEOMS[4], torch.float32, 11)
    out_shape = F.conv2d(x.double(), w.double(), None, s, p, d, g).shape
    go = cl(randn(*out_shape))
    gw = K.conv2d_weight_grad(x, go, w.shape, s, p, d, g, split_k=split_k)
    ref = torch.nn.grad.conv2d_weight(x.double(), w.shape, go.double(), s, p, d, g)
    assert rel(gw, ref) < 2e-5


# ------------------------------------------------ BN backward folded into the grad loads

def _bn_grad_case(geom, dtype, relu_mask, seed):
    x, w, _, _, (s, p, d, g) = make_case(geom, dtype, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    z = F.conv2d(x.double(), w.double(), None, s, p, d, g)
    C = z.shape[1]
    mk = lambda *sh: torch.randn(*sh, generator=gen).to(DEV)  # noqa: E731
    z_t = cl(z.to(dtype))
    out_t = cl(mk(*z.shape).to(dtype)) if relu_mask else None   # ~half the entries <= 0
    go = cl(mk(*z.shape).to(dtype))
    mean, a, b, dd = mk(C), mk(C), mk(C), mk(C)
    gy = go.double()
    if relu_mask:
        gy = torch.where(out_t.double() <= 0, torch.zeros_like(gy), gy)
    gz = pc(a) * gy + pc(b) * (z_t.double() - pc(mean)) + pc(dd)
    bg = K.BNGradPrologue(z=z_t, out=out_t, mean=mean, a=a, b=b, d=dd)
    return x, w, (s, p, d, g), go, gz, bg


@pytest.mark.parametrize("relu_mask", [True, False], ids=["relu", "norelu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("geom", [GEOMS[i] for i in (1, 4, 7)],
                         ids=[GEOM_IDS[i] for i in (1, 4, 7)])
def test_bn_grad_prologue(geom, dtype, relu_mask):
    x, w, (s, p, d, g), go, gz, bg = _bn_grad_case(geom, dtype, relu_mask, 12)
    gi = K.conv2d_input_grad(go, w, x.shape, s, p, d, g, bn_grad=bg)
    ref_gi = torch.nn.grad.conv2d_input(x.shape, w.double(), gz, s, p, d, g)
    assert rel(gi, ref_gi) < tol(dtype)
    gw = K.conv2d_weight_grad(x, go, w.shape, s, p, d, g, bn_grad=bg)
    ref_gw = torch.nn.grad.conv2d_weight(x.double(), w.shape, gz, s, p, d, g)
    assert rel(gw, ref_gw) < tol(dtype)


# ------------------------------------------------------------------------ clear errors

def _ok():
    x = cl(randn(2, 4, 5, 5))
    w = randn(6, 4, 3, 3)
    return x, w


@pytest.mark.parametrize("case,exc,match", [
    ("3d", ValueError, "4-D"),
    ("float64", TypeError, "float16, bfloat16 or float32"),
    ("int", TypeError, "float16, bfloat16 or float32"),
    ("w_dtype", TypeError, "weight dtype"),
    ("cin", ValueError, "input channels per group"),
    ("groups", ValueError, "divisible by groups"),
    ("stride0", ValueError, "stride must be >= 1"),
    ("stride_type", TypeError, "stride must be an int or a pair"),
    ("scale_len", ValueError, "in_scale must be a 1-D vector of 4"),
    ("residual", ValueError, "residual must have the output shape"),
    ("too_small", ValueError, "too small"),
    ("not_tensor", TypeError, "x must be a torch.Tensor"),
    ("w_3d", ValueError, "weight must be 4-D"),
])
def test_forward_errors(case, exc, match):
    x, w = _ok()
    kw = {}
    args = [x, w, 1, 1, 1, 1]
    if case == "3d":
        args[0] = x[0]
    elif case == "float64":
        args[0], args[1] = x.double(), w.double()
    elif case == "int":
        args[0] = x.to(torch.int32)
    elif case == "w_dtype":
        args[1] = w.half()
    elif case == "cin":
        args[1] = randn(6, 3, 3, 3)
    elif case == "groups":
        args[5] = 3
    elif case == "stride0":
        args[2] = 0
    elif case == "stride_type":
        args[2] = 1.5
    elif case == "scale_len":
        kw["in_scale"] = torch.ones(5, device=DEV)
    elif case == "residual":
        kw["residual"] = cl(randn(2, 6, 4, 4))
    elif case == "too_small":
        args[1] = randn(6, 4, 9, 9)
    elif case == "not_tensor":
        args[0] = x.tolist()
    elif case == "w_3d":
        args[1] = w[0]
    with pytest.raises(exc, match=match):
        K.conv2d(*args, **kw)


def test_backward_errors():
    x, w = _ok()
    go = cl(randn(2, 6, 5, 5))
    with pytest.raises(ValueError, match="grad_out must have the conv output shape"):
        K.conv2d_input_grad(go[:, :, :4], w, x.shape, 1, 1, 1, 1)
    with pytest.raises(ValueError, match="grad_out must have the conv output shape"):
        K.conv2d_weight_grad(x, go[:1], w.shape, 1, 1, 1, 1)
    with pytest.raises(TypeError, match="grad_out must have dtype"):
        K.conv2d_weight_grad(x, go.half(), w.shape, 1, 1, 1, 1)
    with pytest.raises(ValueError, match="input_shape must be"):
        K.conv2d_input_grad(go, w, x.shape[:3], 1, 1, 1, 1)
    with pytest.raises(TypeError, match="bn_grad must be a BNGradPrologue"):
        K.conv2d_input_grad(go, w, x.shape, 1, 1, 1, 1, bn_grad=(go,))
    bg = K.BNGradPrologue(z=go, out=None, mean=torch.zeros(5, device=DEV),
                          a=torch.zeros(6, device=DEV), b=torch.zeros(6, device=DEV),
                          d=torch.zeros(6, device=DEV))
    with pytest.raises(ValueError, match="bn_grad.mean must be a 1-D vector of 6"):
        K.conv2d_weight_grad(x, go, w.shape, 1, 1, 1, 1, bn_grad=bg)


@pytest.mark.skipif(CUDA, reason="interpreter-only checks")
def test_interpreter_refuses_bf16_and_cpu_needs_interpreter(monkeypatch):
    x, w = _ok()
    with pytest.raises(TypeError, match="interpreter"):
        K.conv2d(x.bfloat16(), w.bfloat16(), 1, 1, 1, 1)
    monkeypatch.setattr(K, "_INTERPRET", False)
    with pytest.raises(ValueError, match="need CUDA tensors"):
        K.conv2d(x, w, 1, 1, 1, 1)


# ------------------------------------------------------------------------- GPU section

RESNET_GPU_CASES = [
    # (name, N, Cin, Cout, H, W, k, stride, padding, dilation, groups) at ResNet sizes
    ("stem", 4, 3, 64, 224, 224, 7, 2, 3, 1, 1),
    ("l1_1x1", 8, 64, 256, 56, 56, 1, 1, 0, 1, 1),
    ("l1_3x3", 8, 64, 64, 56, 56, 3, 1, 1, 1, 1),
    ("l2_3x3_s2", 8, 128, 128, 56, 56, 3, 2, 1, 1, 1),
    ("l2_down_1x1_s2", 8, 256, 512, 56, 56, 1, 2, 0, 1, 1),
    ("l4_3x3_dil2", 8, 512, 512, 14, 14, 3, 1, 2, 2, 1),
    ("resnext_3x3_g32", 8, 256, 256, 28, 28, 3, 1, 1, 1, 32),
    ("odd", 3, 37, 45, 17, 13, 3, 2, 1, 1, 1),
]


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32],
                         ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("case", RESNET_GPU_CASES, ids=[c[0] for c in RESNET_GPU_CASES])
def test_gpu_resnet_shapes(case, dtype):
    _, N, Cin, Cout, H, W, k, s, p, d, g = case
    gen = torch.Generator(device="cuda").manual_seed(0)
    r = lambda *sh: torch.randn(*sh, device="cuda", generator=gen)  # noqa: E731
    x = cl(r(N, Cin, H, W).to(dtype))
    w = (r(Cout, Cin // g, k, k) / (Cin // g * k * k) ** 0.5).to(dtype)
    scale, shift = r(Cin).abs() + 0.5, r(Cin).abs() * 0.5 + 0.1
    t = tol(dtype)
    xr = prologue_ref(x, scale, shift, True)
    ref = F.conv2d(xr, w.double(), None, s, p, d, g)
    out, mean, var = K.conv2d(x, w, s, p, d, g, in_scale=scale, in_shift=shift, in_relu=True,
                              stats=True)
    assert rel(out, ref) < t
    assert rel(mean, ref.mean((0, 2, 3))) < t
    assert rel(var, ref.var((0, 2, 3), unbiased=False)) < t
    bias, res = r(Cout), cl(r(*ref.shape).to(dtype))
    ref0 = F.conv2d(x.double(), w.double(), None, s, p, d, g)
    out = K.conv2d(x, w, s, p, d, g, bias=bias, residual=res, out_relu=True)
    assert rel(out, (ref0 + pc(bias) + res.double()).clamp_min(0)) < t
    go = cl(r(*ref.shape).to(dtype))
    gi = K.conv2d_input_grad(go, w, x.shape, s, p, d, g)
    assert rel(gi, torch.nn.grad.conv2d_input(x.shape, w.double(), go.double(), s, p, d, g)) < t
    gw = K.conv2d_weight_grad(x, go, w.shape, s, p, d, g, in_scale=scale, in_shift=shift,
                              in_relu=True)
    assert rel(gw, torch.nn.grad.conv2d_weight(xr, w.shape, go.double(), s, p, d, g)) < t


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_gpu_bn_grad_prologue_bf16():
    geom = ("l2", 4, 64, 96, 28, 28, (3, 3), 2, 1, 1, 1)
    x, w, (s, p, d, g), go, gz, bg = _bn_grad_case(geom, torch.bfloat16, True, 21)
    gi = K.conv2d_input_grad(go, w, x.shape, s, p, d, g, bn_grad=bg)
    assert rel(gi, torch.nn.grad.conv2d_input(x.shape, w.double(), gz, s, p, d, g)) < 3e-2
    gw = K.conv2d_weight_grad(x, go, w.shape, s, p, d, g, bn_grad=bg)
    assert rel(gw, torch.nn.grad.conv2d_weight(x.double(), w.shape, gz, s, p, d, g)) < 3e-2


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_gpu_int64_batch_offsets():
    """N*H*W*C > 2^31 elements: the batch offset must be computed in int64 (~4.3 GB bf16)."""
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs >= 40 GiB of GPU memory")
    C, H, W = 64, 56, 56
    N = 2**31 // (C * H * W) + 8            # just past 2^31 elements
    x = cl(torch.randn(N, C, H, W, device="cuda", dtype=torch.bfloat16))
    w = (torch.randn(64, 64, 1, 1, device="cuda") / 8).to(torch.bfloat16)
    out = K.conv2d(x, w, 1, 0, 1, 1)
    tail = slice(N - 4, N)
    ref = F.conv2d(x[tail].double(), w.double())
    assert rel(out[tail], ref) < 3e-2
    del x, out
