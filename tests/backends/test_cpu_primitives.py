"""The C++ CPU kernels (csrc/cpu) of the four primitives against their PyTorch oracle
(fused_resnet.backends.primitives), on fresh random inputs, odd shapes, both memory formats,
every dtype and every optional-argument combination; plus opcheck, input validation,
large-mean statistics, thread-count independence and the generic (non-AVX2) kernels.

Tolerances (relative error ‖a−b‖/‖b‖ against the oracle fed the same inputs):
  * per-channel outputs are in the accumulation dtype (float64 for float64 input,
    float32 otherwise) and are compared with a float64 oracle: 1e-12 / 1e-5, i.e. a
    few float32 roundings after the reduction (the kernels measure ~1e-7);
  * tensor outputs are in the input dtype and are compared with the oracle's rounding
    of the same acc-dtype math: a single rounding of difference at most (an FMA
    against a multiply-add can move a value across a rounding boundary), so about one
    ulp of the output dtype where it happens: 1e-12 (fp64), 1e-5 (fp32),
    2e-3 (fp16: ulp 2^-11 ≈ 4.9e-4), 1e-2 (bf16: ulp 2^-8 ≈ 3.9e-3).
"""
import os
import platform
import re
import subprocess
import sys
import textwrap

from shutil import which as shutil_which

import pytest
import torch

import fused_resnet  # noqa: F401  (loads fused_resnet._C)
from fused_resnet.backends import primitives as P

if not hasattr(torch.ops.fused_resnet, "bn_stats"):
    pytest.skip("the compiled fused_resnet._C (CPU kernels) is not built: "
                "torch.ops.fused_resnet.bn_stats is missing", allow_module_level=True)

ops = torch.ops.fused_resnet
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
TOL_OUT = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3,
           torch.bfloat16: 1e-2}
TOL_ACC = {torch.float64: 1e-12, torch.float32: 1e-5}
# Odd channel counts and spatial sizes: no multiple of any vector width. (2, 40, 1, 1)
# is both NCHW- and channels_last-contiguous; (5, 33) is 2-D [N, C], (4, 6, 7) 3-D.
SHAPES = [(3, 5, 5, 3), (3, 7, 5, 3), (3, 19, 5, 3), (4, 67, 9, 11), (2, 40, 1, 1), (5, 33),
          (4, 6, 7)]
FORMATS = ["nchw", "channels_last"]


def rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    den = b.norm().item()
    return (a - b).norm().item() / den if den > 0 else (a - b).norm().item()


def acc_of(dtype):
    return P.acc_dtype(dtype)


def tol_acc(dtype):
    return TOL_ACC[acc_of(dtype)]


def make(shape, dtype, fmt, offset=0.0, scale=1.0):
    """Fresh random tensor (never zeros/ones) in dtype and memory format."""
    t = (torch.randn(shape) * scale + offset).to(dtype)
    if fmt == "channels_last" and t.dim() == 4:
        t = t.contiguous(memory_format=torch.channels_last)
    return t


def vec(c, dtype, positive=False):
    v = torch.randn(c, dtype=acc_of(dtype))
    return v.abs() + 0.1 if positive else v


def relu_out(shape, dtype, fmt):
    """A saved forward output: ReLU'd, so the ReLU mask has zeros and ones."""
    return make(shape, dtype, fmt).clamp_min(0)


def check_format(result, expected, what):
    assert result.shape == expected.shape, what
    assert result.dtype == expected.dtype, what
    assert result.stride() == expected.stride(), (
        f"{what}: strides {result.stride()} != oracle's {expected.stride()}")


def to64(*ts):
    return [None if t is None else t.double() for t in ts]


# --------------------------------------------------------------------------- bn_stats

@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bn_stats(dtype, fmt):
    for shape in SHAPES:
        x = make(shape, dtype, fmt, offset=0.5, scale=2.0)
        mean, var = ops.bn_stats(x)
        rm, rv = P.bn_stats(x.double())
        for got, ref, name in ((mean, rm, "mean"), (var, rv, "var")):
            assert got.dtype == acc_of(dtype) and got.shape == (shape[1],), name
            err = rel_err(got, ref)
            assert err < tol_acc(dtype), f"{name} {shape} {dtype} {fmt}: rel err {err:.2e}"


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("offset", [100.0, 1e4])
def test_bn_stats_large_mean_fp32(offset, fmt):
    """x = offset + randn in float32 over large N*H*W: must match the two-pass float64
    statistics of the same float32 values to ~1e-6 (a one-pass E[x²]−E[x]² in float32
    would lose every digit of the variance here)."""
    x = make((16, 8, 96, 96), torch.float32, fmt, offset=offset)
    mean, var = ops.bn_stats(x)
    rm, rv = P.bn_stats(x.double())
    assert rel_err(mean, rm) < 1e-6
    assert rel_err(var, rv) < 1e-6, f"var rel err {rel_err(var, rv):.2e}"


# --------------------------------------------------------------------------- bn_apply

@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bn_apply(dtype, fmt):
    for shape in SHAPES:
        c = shape[1]
        x, res, x2 = (make(shape, dtype, fmt) for _ in range(3))
        scale, shift, scale2, shift2 = vec(c, dtype), vec(c, dtype), vec(c, dtype), vec(c, dtype)
        for has_res in (False, True):
            for has_x2 in (False, True):
                for relu in (False, True):
                    args = (x, scale, shift, res if has_res else None,
                            x2 if has_x2 else None, scale2 if has_x2 else None,
                            shift2 if has_x2 else None, relu)
                    what = f"{shape} {dtype} {fmt} res={has_res} x2={has_x2} relu={relu}"
                    out = ops.bn_apply(*args)
                    ref = P.bn_apply(*args)
                    check_format(out, ref, what)
                    err = rel_err(out, ref)
                    assert err < TOL_OUT[dtype], f"{what}: rel err {err:.2e}"


# --------------------------------------------------------------------- bn_backward_*

@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bn_backward_reduce(dtype, fmt):
    for shape in SHAPES:
        c = shape[1]
        go, x, x2 = (make(shape, dtype, fmt) for _ in range(3))
        out = relu_out(shape, dtype, fmt)
        mean, mean2 = vec(c, dtype), vec(c, dtype)
        for has_out in (False, True):
            for has_x2 in (False, True):
                o = out if has_out else None
                z, m2 = (x2, mean2) if has_x2 else (None, None)
                what = f"{shape} {dtype} {fmt} out={has_out} x2={has_x2}"
                got = ops.bn_backward_reduce(go, o, x, mean, z, m2)
                ref = P.bn_backward_reduce(*to64(go, o, x, mean, z, m2))
                for g, r, name in zip(got, ref, ("sum_g", "sum_g_xmu", "sum_g_xmu2")):
                    assert g.dtype == acc_of(dtype), f"{what} {name}"
                    assert g.shape == r.shape, f"{what} {name}"
                    if r.numel():
                        err = rel_err(g, r)
                        assert err < tol_acc(dtype), f"{what} {name}: rel err {err:.2e}"


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bn_backward_apply(dtype, fmt):
    for shape in SHAPES:
        c = shape[1]
        go, x, x2 = (make(shape, dtype, fmt) for _ in range(3))
        out = relu_out(shape, dtype, fmt)
        coefs = [vec(c, dtype) for _ in range(8)]  # mean a b d mean2 a2 b2 d2
        for has_out in (False, True):
            for shortcut in ("none", "identity", "projection"):
                o = out if has_out else None
                if shortcut == "projection":
                    extra = (x2, *coefs[4:])
                else:
                    extra = (None, None, None, None, None)
                args = (go, o, x, *coefs[:4], *extra, shortcut == "identity")
                what = f"{shape} {dtype} {fmt} out={has_out} shortcut={shortcut}"
                gx, gs = ops.bn_backward_apply(*args)
                rx, rs = P.bn_backward_apply(*args)
                check_format(gx, rx, what + " grad_x")
                check_format(gs, rs, what + " grad_shortcut")
                err = rel_err(gx, rx)
                assert err < TOL_OUT[dtype], f"{what} grad_x: rel err {err:.2e}"
                if shortcut != "none":
                    err = rel_err(gs, rs)
                    assert err < TOL_OUT[dtype], f"{what} grad_shortcut: rel err {err:.2e}"
                else:
                    assert gs.numel() == 0


# ----------------------------------------------------------- layouts and edge cases

def test_mixed_and_strided_layouts():
    """Inputs in other layouts than x are converted; a non-contiguous x (neither
    format) is made contiguous and gives NCHW-contiguous outputs."""
    dt = torch.float32
    shape = (3, 19, 6, 5)
    x_cl = make(shape, dt, "channels_last")
    res = make(shape, dt, "nchw")
    scale, shift = vec(19, dt), vec(19, dt)
    out = ops.bn_apply(x_cl, scale, shift, res, None, None, None, True)
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    assert rel_err(out, P.bn_apply(x_cl, scale, shift, res, None, None, None, True)) < 1e-6

    x_strided = make((3, 19, 6, 10), dt, "nchw")[..., ::2]
    assert not x_strided.is_contiguous()
    assert not x_strided.is_contiguous(memory_format=torch.channels_last)
    out = ops.bn_apply(x_strided, scale, shift, None, None, None, None, False)
    assert out.is_contiguous()
    assert rel_err(out, P.bn_apply(x_strided, scale, shift, None, None, None, None, False)) < 1e-6
    m, v = ops.bn_stats(x_strided)
    rm, rv = P.bn_stats(x_strided.double())
    assert rel_err(m, rm) < 1e-6 and rel_err(v, rv) < 1e-6
    go = make(x_strided.shape, dt, "channels_last")
    s = ops.bn_backward_reduce(go, None, x_strided, m, None, None)
    r = P.bn_backward_reduce(go.double(), None, x_strided.double(), m.double(), None, None)
    assert rel_err(s[0], r[0]) < 1e-5 and rel_err(s[1], r[1]) < 1e-5


def test_empty_batch():
    x = torch.randn(0, 4, 3, 3)
    m, v = ops.bn_stats(x)
    assert m.shape == (4,) and torch.isnan(m).all() and torch.isnan(v).all()
    out = ops.bn_apply(x, torch.randn(4), torch.randn(4), None, None, None, None, True)
    assert out.shape == x.shape
    sg, sgx, sgx2 = ops.bn_backward_reduce(x, None, x, torch.randn(4), None, None)
    assert sg.shape == (4,) and not sg.any() and sgx2.numel() == 0


def test_nan_handling():
    """NaN propagates through bn_apply's ReLU (clamp_min), and a NaN saved output passes
    its gradient through the ReLU mask ((out <= 0) ? 0 : g, as eager's
    threshold_backward), like the oracle."""
    dt = torch.float32
    x = make((2, 9, 4, 4), dt, "channels_last")
    x[0, 3, 1, 1] = float("nan")
    scale, shift = vec(9, dt), vec(9, dt)
    out = ops.bn_apply(x, scale, shift, None, None, None, None, True)
    ref = P.bn_apply(x, scale, shift, None, None, None, None, True)
    assert torch.isnan(out[0, 3, 1, 1]) and torch.isnan(ref[0, 3, 1, 1])
    assert torch.equal(out.isnan(), ref.isnan())
    assert rel_err(out.nan_to_num(), ref.nan_to_num()) < 1e-6
    go, xf = make(x.shape, dt, "channels_last"), x.nan_to_num()
    coefs = [vec(9, dt) for _ in range(4)]
    args = (go, out, xf, *coefs, None, None, None, None, None, True)
    gx, gs = ops.bn_backward_apply(*args)
    rx, rs = P.bn_backward_apply(*args)
    assert torch.isfinite(gx).all() and gs[0, 3, 1, 1] == go[0, 3, 1, 1]
    assert rel_err(gx, rx) < 1e-6 and torch.equal(gs, rs)
    sums = ops.bn_backward_reduce(go, out, xf, coefs[0], None, None)
    ref = P.bn_backward_reduce(go.double(), out.double(), xf.double(), coefs[0].double(),
                               None, None)
    assert rel_err(sums[0], ref[0]) < 1e-5 and rel_err(sums[1], ref[1]) < 1e-5


# --------------------------------------------------------------------- opcheck

def _opcheck_cases(dtype, fmt):
    shape = (3, 7, 5, 3)
    c = shape[1]
    x, res, x2, go = (make(shape, dtype, fmt) for _ in range(4))
    out = relu_out(shape, dtype, fmt)
    v = [vec(c, dtype) for _ in range(8)]
    return [
        (ops.bn_stats.default, (x,)),
        (ops.bn_apply.default, (x, v[0], v[1], None, None, None, None, False)),
        (ops.bn_apply.default, (x, v[0], v[1], res, x2, v[2], v[3], True)),
        (ops.bn_backward_reduce.default, (go, None, x, v[0], None, None)),
        (ops.bn_backward_reduce.default, (go, out, x, v[0], x2, v[1])),
        (ops.bn_backward_apply.default,
         (go, None, x, v[0], v[1], v[2], v[3], None, None, None, None, None, False)),
        (ops.bn_backward_apply.default,
         (go, out, x, v[0], v[1], v[2], v[3], None, None, None, None, None, True)),
        (ops.bn_backward_apply.default,
         (go, out, x, v[0], v[1], v[2], v[3], x2, v[4], v[5], v[6], v[7], False)),
    ]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_opcheck(dtype, fmt):
    for op, args in _opcheck_cases(dtype, fmt):
        torch.library.opcheck(op, args)


# --------------------------------------------------------------------- errors

def test_errors():
    dt = torch.float32
    x = make((2, 5, 4, 3), dt, "nchw")
    s, b = vec(5, dt), vec(5, dt)
    with pytest.raises(RuntimeError, match=r"bn_stats: expected x to be a 4-D"):
        ops.bn_stats(torch.randn(7))
    with pytest.raises(RuntimeError, match=r"expected x to be a 4-D .* 5-D"):
        ops.bn_stats(torch.randn(2, 3, 2, 2, 2))
    with pytest.raises(RuntimeError, match=r"expected x to have dtype float64, float32, "
                                            r"bfloat16 or float16, got Int"):
        ops.bn_stats(torch.randint(0, 5, (2, 5, 4, 3), dtype=torch.int32))
    with pytest.raises(RuntimeError, match=r"expected residual to have the shape of x "
                                            r"\[2, 5, 4, 3\], got \[2, 5, 3, 4\]"):
        ops.bn_apply(x, s, b, torch.randn(2, 5, 3, 4), None, None, None, True)
    with pytest.raises(RuntimeError, match=r"expected residual to have the dtype of x"):
        ops.bn_apply(x, s, b, x.double(), None, None, None, True)
    with pytest.raises(RuntimeError, match=r"expected scale to be a per-channel vector of "
                                            r"shape \[5\]"):
        ops.bn_apply(x, torch.randn(4), b, None, None, None, None, True)
    with pytest.raises(RuntimeError, match=r"expected shift to have a floating dtype"):
        ops.bn_apply(x, s, torch.arange(5), None, None, None, None, True)
    with pytest.raises(RuntimeError, match=r"scale2 is required when x2 is given"):
        ops.bn_apply(x, s, b, None, x, None, b, True)
    with pytest.raises(RuntimeError, match=r"scale2 was given but x2 is None"):
        ops.bn_apply(x, s, b, None, None, s, None, True)
    with pytest.raises(RuntimeError, match=r"bn_backward_reduce: expected grad_out to have "
                                            r"the shape of x"):
        ops.bn_backward_reduce(x[:1], None, x, s, None, None)
    with pytest.raises(RuntimeError, match=r"mean2 is required when x2 is given"):
        ops.bn_backward_reduce(x, None, x, s, x, None)
    with pytest.raises(RuntimeError, match=r"expected out to have the dtype of x"):
        ops.bn_backward_apply(x, x.half(), x, s, s, s, s, None, None, None, None, None, False)
    with pytest.raises(RuntimeError, match=r"d2 is required when x2 is given"):
        ops.bn_backward_apply(x, None, x, s, s, s, s, x, s, s, s, None, False)
    with pytest.raises(RuntimeError, match=r"a2 was given but x2 is None"):
        ops.bn_backward_apply(x, None, x, s, s, s, s, None, None, s, None, None, False)
    # an empty tensor is not "absent": only None is
    with pytest.raises(RuntimeError, match=r"expected residual to have the shape of x"):
        ops.bn_apply(x, s, b, torch.empty(0), None, None, None, True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device for a "
                    "second device")
def test_error_wrong_device():
    x = torch.randn(2, 5, 4, 3)
    with pytest.raises(RuntimeError):
        ops.bn_apply(x, torch.randn(5, device="cuda"), torch.randn(5), None, None, None,
                     None, True)


# --------------------------------------------------------------------- threads, ISA

@pytest.mark.parametrize("fmt", FORMATS)
def test_two_threads_match_one_thread(fmt):
    """Two threads give the oracle's result, bit for bit the one-thread result: the
    reductions merge fixed chunks in a fixed order, whatever the thread count."""
    dt = torch.float32
    shape = (8, 24, 33, 35)
    x, res, go = (make(shape, dt, fmt, offset=3.0) for _ in range(3))
    out = relu_out(shape, dt, fmt)
    v = [vec(shape[1], dt) for _ in range(4)]

    def run():
        return (*ops.bn_stats(x), ops.bn_apply(x, v[0], v[1], res, None, None, None, True),
                *ops.bn_backward_reduce(go, out, x, v[0], None, None)[:2],
                *ops.bn_backward_apply(go, out, x, *v, None, None, None, None, None, True))

    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(2)
        two = run()
    finally:
        torch.set_num_threads(old)
    for a, b in zip(one, two):
        assert torch.equal(a, b)
    m, var = P.bn_stats(x.double())
    assert rel_err(two[0], m) < 1e-6 and rel_err(two[1], var) < 1e-6
    assert rel_err(two[2], P.bn_apply(x, v[0], v[1], res, None, None, None, True)) < 1e-6


def test_generic_kernels_subprocess():
    """The generic at::vec kernels (used on CPUs without AVX2; forced here with
    ATEN_CPU_CAPABILITY=default) against the oracle, in a fresh process."""
    code = textwrap.dedent("""
        import torch, fused_resnet
        from fused_resnet.backends import primitives as P
        assert torch.backends.cpu.get_cpu_capability() == "DEFAULT"
        ops = torch.ops.fused_resnet
        torch.manual_seed(0)
        def rel(a, b):
            a, b = a.double(), b.double()
            return ((a - b).norm() / b.norm()).item()
        for dt, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5),
                        (torch.bfloat16, 1e-2), (torch.float16, 2e-3)):
            acc = P.acc_dtype(dt)
            for cl in (False, True):
                for shape in ((3, 19, 5, 3), (4, 67, 9, 11)):
                    mk = lambda: torch.randn(shape).to(dt).contiguous(
                        memory_format=torch.channels_last if cl else torch.contiguous_format)
                    x, r, x2, go = mk(), mk(), mk(), mk()
                    out = mk().clamp_min(0)
                    out[0, 1, 0, 0] = float("nan")  # passes its gradient (out <= 0 masks)
                    v = [torch.randn(shape[1], dtype=acc) for _ in range(8)]
                    tol_acc = 1e-12 if dt == torch.float64 else 1e-5
                    for a, b in zip(ops.bn_stats(x), P.bn_stats(x.double())):
                        assert rel(a, b) < tol_acc, (dt, cl, shape, 'stats')
                    args = (x, v[0], v[1], r, x2, v[2], v[3], True)
                    assert rel(ops.bn_apply(*args), P.bn_apply(*args)) < tol, (dt, cl, 'apply')
                    args = (go, out, x, v[0], x2, v[1])
                    ref = P.bn_backward_reduce(*[t.double() for t in args])
                    for a, b in zip(ops.bn_backward_reduce(*args), ref):
                        assert rel(a, b) < tol_acc, (dt, cl, 'reduce')
                    args = (go, out, x, *v[:4], x2, *v[4:], False)
                    for a, b in zip(ops.bn_backward_apply(*args), P.bn_backward_apply(*args)):
                        assert rel(a, b) < tol, (dt, cl, 'bwd_apply')
        print("OK")
    """)
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or not shutil_which("objdump"),
                    reason="x86-64 only, needs objdump")
def test_avx_code_stays_in_avx2_kernels():
    """The AVX2 kernels are the same source compiled with `#pragma GCC target` in
    kernels_avx2.cpp: every function of the built library that uses AVX/VEX
    instructions must belong to them (namespaces fused_resnet::cpu::AVX2 or
    at::vec::AVX2), or the library could fault on a CPU without AVX2 (see that file)."""
    import fused_resnet._C as ext
    dump = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", ext.__file__],
                          capture_output=True, text=True, timeout=120).stdout
    leaked, fn = set(), None
    vex = re.compile(r"%ymm|\tv[a-z0-9]+\s")
    for line in dump.splitlines():
        m = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if m:
            fn = m.group(1)
        elif fn and "AVX2" not in fn and vex.search(line):
            leaked.add(fn)
    assert not leaked, "AVX code outside the AVX2 kernels: " + ", ".join(sorted(leaked)[:10])
