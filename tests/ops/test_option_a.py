"""The option-A shortcut operator (fused_resnet/ops/bn_add_relu_option_a.py) at odd
spatial sizes against an eager oracle (every dtype, both memory formats), opcheck and
float64 gradcheck; its compiled CPU primitives against the plain-PyTorch ones when built,
and the CUDA ones on a GPU."""
import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import fused_resnet
from fused_resnet import ops
from fused_resnet.backends import has_compiled_kernel
from fused_resnet.backends import primitives as P
from conftest import TOL, rel_err

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
FORMATS = [torch.contiguous_format, torch.channels_last]
COMPILED = has_compiled_kernel("bn_apply_option_a", "cpu")


# --- the option-A operator ------------------------------------------------------------------

def _oracle(z, gamma, beta, rm, rv, x, stride, training, eps, relu):
    """The op written plainly: F.batch_norm + F.pad of the subsampled input."""
    use_batch = training or rm is None
    out = F.batch_norm(z, None if use_batch else rm, None if use_batch else rv, gamma, beta,
                       use_batch, 0.0, eps)
    out = out + F.pad(x[:, :, ::stride, ::stride], (0, 0, 0, 0, 0, z.shape[1] - x.shape[1]))
    acc = torch.float64 if z.dtype == torch.float64 else torch.float32
    zd = z.detach().to(acc)
    stats = ((zd.mean((0, 2, 3)), zd.var((0, 2, 3), unbiased=False)) if use_batch
             else (rm.to(acc), rv.to(acc)))
    return (F.relu(out) if relu else out), *stats


# (N, C_in, C, H_in, W_in, stride): odd sizes, no padding, stride 1, stride 3
SHAPES = [(3, 3, 7, 7, 5, 2), (2, 4, 8, 9, 9, 2), (2, 5, 5, 6, 4, 1), (2, 2, 6, 11, 10, 3),
          (3, 4, 4, 9, 7, 2)]


def _case(shape, dtype, fmt, training=True, relu=True, with_stats=True):
    n, cin, c, h, w, s = shape
    ho, wo = -(-h // s), -(-w // s)
    pd = torch.float64 if dtype == torch.float64 else torch.float32
    z = (torch.randn(n, c, ho, wo, dtype=torch.float64) * 1.5 - 0.3).to(dtype)
    x = torch.randn(n, cin, h, w, dtype=torch.float64).to(dtype)
    z = z.contiguous(memory_format=fmt).requires_grad_()
    x = x.contiguous(memory_format=fmt).requires_grad_()
    gamma = torch.rand(c, dtype=pd).add_(0.5).requires_grad_()
    beta = torch.randn(c, dtype=pd).requires_grad_()
    rm = torch.randn(c, dtype=pd) if with_stats else None
    rv = torch.rand(c, dtype=pd).add_(0.5) if with_stats else None
    return [z, gamma, beta, rm, rv, x, s, training, 1e-5, relu]


def _clone(args, dtype=None):
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            b = a.detach().clone()
            if dtype is not None and b.is_floating_point():
                b = b.to(dtype)
            out.append(b.requires_grad_(a.requires_grad))
        else:
            out.append(a)
    return out


def _compare(args, dtype):
    a, b = _clone(args), _clone(args, torch.float64)
    outs = ops.bn_add_relu_option_a(*a)
    ref = _oracle(*b)
    gw = torch.randn(ref[0].shape, dtype=torch.float64)
    (outs[0].double() * gw).sum().backward()
    (ref[0] * gw).sum().backward()
    tol = TOL[dtype]
    assert outs[0].dtype == dtype and outs[0].shape == ref[0].shape
    for i, (o, r) in enumerate(zip(outs, ref)):
        assert rel_err(o, r) < tol, f"output {i}: {rel_err(o, r):.3g}"
    for i in (0, 1, 2, 5):
        assert a[i].grad is not None and a[i].grad.shape == a[i].shape
        assert a[i].grad.dtype == a[i].dtype
        assert rel_err(a[i].grad, b[i].grad) < 4 * tol, f"grad {i}: {rel_err(a[i].grad, b[i].grad):.3g}"
    return outs, a


@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_option_a_op_matches_oracle(backend, shape, dtype, fmt):
    outs, args = _compare(_case(shape, dtype, fmt), dtype)
    if fmt == torch.channels_last:
        assert outs[0].is_contiguous(memory_format=torch.channels_last)
    # the gradient of x is exactly zero off the subsampled grid
    gx = args[5].grad
    s = shape[-1]
    off_grid = torch.ones_like(gx, dtype=torch.bool)
    off_grid[:, :, ::s, ::s] = False
    if off_grid.any():
        assert gx[off_grid].abs().max().item() == 0


@pytest.mark.parametrize("mode", ["eval", "no_running_stats", "no_relu"])
def test_option_a_op_modes(backend, mode):
    args = _case((2, 3, 6, 7, 9, 2), torch.float64, torch.contiguous_format,
                 training=mode == "no_relu", relu=mode != "no_relu",
                 with_stats=mode != "no_running_stats")
    if mode == "no_running_stats":
        args[7] = False  # eval without running stats: batch statistics, as nn.BatchNorm2d
    _compare(args, torch.float64)


def test_option_a_nan_passes_gradient_like_eager(backend):
    args = _case((2, 2, 4, 5, 5, 2), torch.float64, torch.contiguous_format)
    args[0].data[0, 1, 1, 1] = float("nan")
    a, b = _clone(args), _clone(args)
    ops.bn_add_relu_option_a(*a)[0].sum().backward()
    _oracle(*b)[0].sum().backward()
    torch.testing.assert_close(a[5].grad, b[5].grad, equal_nan=True)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "nhwc"])
def test_option_a_opcheck(backend, fmt, training):
    for dtype in (torch.float64, torch.float32):
        opcheck(ops.bn_add_relu_option_a,
                tuple(_case((2, 3, 5, 7, 5, 2), dtype, fmt, training)))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_option_a_gradcheck(backend, training):
    args = _case((2, 2, 3, 5, 3, 2), torch.float64, torch.channels_last, training)
    diff = (0, 1, 2, 5)

    def f(z, gamma, beta, x):
        full = list(args)
        full[0], full[1], full[2], full[5] = z, gamma, beta, x
        return ops.bn_add_relu_option_a(*full)[0]

    inputs = tuple(args[i].detach().clone().requires_grad_() for i in diff)
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_option_a_errors(backend):
    z = torch.randn(2, 8, 4, 4)
    gamma, beta = torch.ones(8), torch.zeros(8)
    op = ops.bn_add_relu_option_a
    with pytest.raises(RuntimeError, match="does not fit"):
        op(z, gamma, beta, None, None, torch.randn(2, 4, 9, 9), 2, True, 1e-5, True)
    with pytest.raises(RuntimeError, match="does not fit"):
        op(z, gamma, beta, None, None, torch.randn(2, 9, 8, 8), 2, True, 1e-5, True)
    with pytest.raises(RuntimeError, match="float32 tensor"):
        op(z, gamma, beta, None, None, torch.randn(2, 4, 8, 8).double(), 2, True, 1e-5, True)
    with pytest.raises(ValueError, match="stride"):
        op(z, gamma, beta, None, None, torch.randn(2, 4, 8, 8), 0, True, 1e-5, True)
    with pytest.raises(RuntimeError, match="should contain 8 elements"):
        op(z, gamma[:3], beta, None, None, torch.randn(2, 4, 8, 8), 2, True, 1e-5, True)


# --- the compiled primitives against the plain-PyTorch ones ---------------------------------

@pytest.mark.skipif(not COMPILED, reason="fused_resnet._C built without the option-A kernels")
@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES + [(2, 16, 32, 8, 8, 2)], ids=lambda s: "x".join(map(str, s)))
def test_compiled_option_a_primitives(shape, dtype, fmt):
    n, cin, c, h, w, s = shape
    ho, wo = -(-h // s), -(-w // s)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    mk = lambda *size: torch.randn(*size, dtype=torch.float64).to(dtype).contiguous(memory_format=fmt)  # noqa: E731
    z, x, go = mk(n, c, ho, wo), mk(n, cin, h, w), mk(n, c, ho, wo)
    scale, shift, mean, a, b, d = (torch.randn(c, dtype=acc) for _ in range(6))
    for relu in (True, False):
        ref = P.bn_apply_option_a(z, scale, shift, x, s, relu)
        got = torch.ops.fused_resnet.bn_apply_option_a(z, scale, shift, x, s, relu)
        assert got.dtype == dtype and got.stride() == ref.stride()
        assert rel_err(got, ref) < TOL[dtype] / 4
    out = ref
    for mask in (out, None):
        refs = P.bn_backward_apply_option_a(go, mask, z, mean, a, b, d, list(x.shape), s)
        gots = torch.ops.fused_resnet.bn_backward_apply_option_a(go, mask, z, mean, a, b, d,
                                                                 list(x.shape), s)
        for r, g in zip(refs, gots):
            assert g.dtype == dtype and g.shape == r.shape and g.stride() == r.stride()
            assert rel_err(g, r) < TOL[dtype] / 4
        assert torch.equal(gots[1], refs[1])  # a scatter of the rounded g: exact


@pytest.mark.skipif(not COMPILED, reason="fused_resnet._C built without the option-A kernels")
def test_compiled_option_a_opcheck_and_errors():
    z = torch.randn(2, 6, 4, 3).contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 7, 5).contiguous(memory_format=torch.channels_last)
    v = [torch.randn(6) for _ in range(4)]
    opcheck(torch.ops.fused_resnet.bn_apply_option_a.default, (z, v[0], v[1], x, 2, True))
    opcheck(torch.ops.fused_resnet.bn_backward_apply_option_a.default,
            (torch.randn_like(z), z, z, *v, list(x.shape), 2))
    with pytest.raises(RuntimeError, match="does not fit"):
        torch.ops.fused_resnet.bn_apply_option_a(z, v[0], v[1], x[:, :, :3], 2, True)
    with pytest.raises(RuntimeError, match="dtype of x"):
        torch.ops.fused_resnet.bn_apply_option_a(z, v[0], v[1], x.double(), 2, True)


def test_backend_uses_compiled_kernel_when_built():
    from fused_resnet import backends
    if "cpu" not in fused_resnet.available_backends():
        pytest.skip("no compiled CPU backend")
    assert has_compiled_kernel("bn_apply_option_a", "cpu") == COMPILED
    # with or without the kernels, the cpu backend computes option A
    args = _case((2, 3, 6, 7, 9, 2), torch.float64, torch.contiguous_format)
    with fused_resnet.use_backend("cpu"):
        assert backends.resolve(torch.device("cpu")).name == "cpu"
        _compare(args, torch.float64)


# --- CUDA (skipped without a GPU; the kernels of csrc/cuda/option_a.cu) ---------------------

CUDA_OPTION_A = (torch.cuda.is_available() and "cuda" in fused_resnet.available_backends()
                 and has_compiled_kernel("bn_apply_option_a", "cuda"))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA_OPTION_A, reason="needs a GPU and the CUDA option-A kernels")
@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES + [(8, 16, 32, 33, 31, 2)], ids=lambda s: "x".join(map(str, s)))
def test_cuda_option_a_primitives(shape, dtype, fmt):
    n, cin, c, h, w, s = shape
    ho, wo = -(-h // s), -(-w // s)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    mk = lambda *size: torch.randn(*size, dtype=torch.float64).to(dtype).contiguous(memory_format=fmt)  # noqa: E731
    z, x, go = mk(n, c, ho, wo), mk(n, cin, h, w), mk(n, c, ho, wo)
    vecs = [torch.randn(c, dtype=acc) for _ in range(6)]
    cu = lambda *ts: [t.cuda() for t in ts]  # noqa: E731
    for relu in (True, False):
        ref = P.bn_apply_option_a(z, vecs[0], vecs[1], x, s, relu)
        got = torch.ops.fused_resnet.bn_apply_option_a(*cu(z, vecs[0], vecs[1], x), s, relu)
        assert got.dtype == dtype and got.stride() == ref.stride()
        assert rel_err(got.cpu(), ref) < TOL[dtype] / 4
    for mask in (ref, None):
        refs = P.bn_backward_apply_option_a(go, mask, z, *vecs[2:], list(x.shape), s)
        gots = torch.ops.fused_resnet.bn_backward_apply_option_a(
            go.cuda(), None if mask is None else mask.cuda(), *cu(z, *vecs[2:]), list(x.shape), s)
        for r, g in zip(refs, gots):
            assert g.shape == r.shape and g.stride() == r.stride()
            assert rel_err(g.cpu(), r) < TOL[dtype] / 4
