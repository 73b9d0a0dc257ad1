"""The `triton` backend (fused_resnet/backends/triton.py): every block operator against the
plain-PyTorch oracle (fused_resnet.testing.reference), with spies checking that the fused Triton
paths really run (BN+ReLU prologue, statistics epilogue, bias/residual/ReLU epilogue,
BN backward folded into the backward convolutions), the ATen fallbacks (float64 exactly
as the reference backend, NCHW, bf16 under the interpreter), opcheck, the statistics
epilogue's accuracy, and a tiny full ResNet against torchvision.

Without CUDA the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set by
tests/conftest.py before fused_resnet is imported) on tiny odd shapes, fp32 and fp16,
channels_last. The GPU section (skipped without CUDA) runs the block ops in bf16/fp16 and ResNet-50 under bf16
autocast against fp32.

Tolerances are those of tests/test_ops.py (conftest.TOL, gradients 4x): a float64 oracle
fed the same rounded inputs.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.library import opcheck

import fused_resnet
import fused_resnet.kernels as kernels
from fused_resnet import backends, ops
from fused_resnet.backends import triton as triton_backend
from fused_resnet.ops import ConvArgs
from fused_resnet.testing import reference
from conftest import TOL, rel_err
from op_cases import CASES, as_tuple, clone_args

CUDA = torch.cuda.is_available()
if not kernels.AVAILABLE:  # pragma: no cover
    pytest.skip(f"triton is unusable here: {kernels.IMPORT_ERROR}", allow_module_level=True)
if not CUDA and not kernels.is_interpreter():  # pragma: no cover
    pytest.skip("no CUDA and the kernels are not interpreted", allow_module_level=True)
K = kernels.conv

DEV = "cuda" if CUDA else "cpu"
CL = torch.channels_last
CPU_DTYPES = [torch.float32, torch.float16]


@pytest.fixture(autouse=True)
def _triton():
    """The triton backend, a fixed seed, and no TF32 (on a GPU the fp32 tests hold the
    kernels to fp32 tolerances: they then use IEEE fp32 as cuDNN does)."""
    torch.manual_seed(0)
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with fused_resnet.use_backend("triton"):
            yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


class Spy:
    """Records the calls of the Triton kernels (and their fusion arguments) and of the
    in-place ReLU mask, by wrapping them on the kernels module the backend uses."""

    def __init__(self, monkeypatch):
        self.calls = []
        for name in ("conv2d", "conv2d_input_grad", "conv2d_weight_grad"):
            monkeypatch.setattr(K, name, self._wrap(name, getattr(K, name)))
        monkeypatch.setattr(kernels.relu_mask, "relu_mask_",
                            self._wrap("relu_mask_", kernels.relu_mask.relu_mask_))

    def _wrap(self, name, fn):
        def spy(*args, **kwargs):
            self.calls.append((name, kwargs))
            return fn(*args, **kwargs)
        return spy

    def names(self):
        return [n for n, _ in self.calls]

    def kw(self, name):
        found = [k for n, k in self.calls if n == name]
        assert found, f"{name} was not called: {self.names()}"
        return found


@pytest.fixture
def spy(monkeypatch):
    return Spy(monkeypatch)


# --- comparison against the oracle, on any device -------------------------------------------

def _to(args, device):
    return [a.detach().to(device).requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor)
            else a for a in args]


def _run(fn, args, grad_seed=1):
    outs = as_tuple(fn(*args))
    g = torch.Generator().manual_seed(grad_seed)
    weight = torch.randn(outs[0].shape, generator=g, dtype=torch.float64).to(outs[0].device)
    (outs[0].double() * weight).sum().backward()
    return outs, [a.grad if isinstance(a, torch.Tensor) and a.requires_grad else None for a in args]


def compare(name, args, dtype, tol=None):
    """ops.<name> on the current backend vs reference.<name> in float64 on the same
    rounded inputs: every output and every input gradient."""
    tol = TOL[dtype] if tol is None else tol
    outs, grads = _run(getattr(ops, name), clone_args(args))
    ref_outs, ref_grads = _run(getattr(reference, name), clone_args(args, torch.float64))
    assert outs[0].dtype == dtype
    errs = {}
    for i, (a, b) in enumerate(zip(outs, ref_outs)):
        if b.numel():
            errs[f"out{i}"] = rel_err(a, b)
            assert errs[f"out{i}"] < tol, f"{name} output {i}: {errs[f'out{i}']:.3g} >= {tol}"
    for i, (a, b) in enumerate(zip(grads, ref_grads)):
        if b is None:
            continue
        assert a is not None, f"{name}: no gradient for argument {i}"
        assert a.dtype == args[i].dtype and a.shape == args[i].shape
        errs[f"grad{i}"] = rel_err(a, b)
        assert errs[f"grad{i}"] < 4 * tol, f"{name} grad of arg {i}: {errs[f'grad{i}']:.3g}"
    return outs, grads, errs


def _case(name, dtype, training=True, fmt=CL, **kw):
    if name == "conv_bias_act":
        return CASES[name](dtype, fmt, **kw)
    return CASES[name](dtype, fmt, training=training, **kw)


# --- every block op, fp32 / fp16, train / eval, with the fused paths checked -------------------

def _check_fusions(spy, name, training, relu=True):
    names = spy.names()
    if name == "conv_bn_relu":
        fwd = spy.kw("conv2d")[0]
        assert fwd.get("stats", False) == training        # statistics from the epilogue
        for bwd in ("conv2d_input_grad", "conv2d_weight_grad"):
            assert spy.kw(bwd)[0]["bn_grad"] is not None   # BN backward folded in
    elif name == "bn_relu_conv":
        fwd = spy.kw("conv2d")[0]
        assert fwd["in_scale"] is not None and fwd["in_relu"]   # BN+ReLU prologue
        assert spy.kw("conv2d_weight_grad")[0]["in_scale"] is not None
        assert "conv2d_input_grad" in names and "relu_mask_" in names
    elif name == "bn_add_relu":
        assert names == []
    elif name == "conv_bias_act":
        fwd = spy.kw("conv2d")[0]
        assert fwd["bias"] is not None and fwd["out_relu"] == relu
        for bwd in ("conv2d_input_grad", "conv2d_weight_grad"):
            assert (spy.kw(bwd)[0]["bn_grad"] is not None) == relu   # ReLU mask folded in


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_op_matches_reference(spy, name, dtype, training):
    if name == "conv_bias_act" and not training:
        pytest.skip("conv_bias_act has no training mode")
    outs, _, _ = compare(name, _to(_case(name, dtype, training), DEV), dtype)
    assert outs[0].is_contiguous(memory_format=CL)
    _check_fusions(spy, name, training)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("conv", [dict(k=1, stride=2), dict(k=3, stride=2), dict(k=3, groups=2),
                                  dict(k=3, dilation=2)],
                         ids=["1x1s2", "3x3s2", "3x3g2", "3x3d2"])
def test_bn_relu_conv_geometry(spy, conv, training):
    compare("bn_relu_conv", _to(_case("bn_relu_conv", torch.float32, training, **conv), DEV),
            torch.float32)
    _check_fusions(spy, "bn_relu_conv", training)


@pytest.mark.parametrize("relu", [True, False], ids=["relu", "norelu"])
def test_conv_bn_relu_stride1(spy, relu):
    compare("conv_bn_relu", _to(_case("conv_bn_relu", torch.float32, stride=1, relu=relu), DEV),
            torch.float32)
    _check_fusions(spy, "conv_bn_relu", True)


@pytest.mark.parametrize("residual,relu", [(False, True), (True, False), (False, False)])
def test_conv_bias_act_modes(spy, residual, relu):
    compare("conv_bias_act", _to(CASES["conv_bias_act"](torch.float32, CL, residual, relu,
                                                        stride=1), DEV), torch.float32)
    _check_fusions(spy, "conv_bias_act", True, relu)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("variant", ["projection", "none"])
def test_bn_add_relu_variants(variant, training):
    args = CASES["bn_add_relu"](torch.float32, CL, training, projection=variant == "projection",
                                identity=False)
    compare("bn_add_relu", _to(args, DEV), torch.float32)


def test_gradient_through_returned_conv_output(spy):
    """A loss on conv_bn_relu's z as well: grad_z is added before the conv backward (the
    BN backward is then materialised, the convolutions still run on Triton)."""
    args = _to(_case("conv_bn_relu", torch.float32), DEV)
    a, b = clone_args(args), clone_args(args, torch.float64)
    out, z, *_ = ops.conv_bn_relu(*a)
    (out.sum() + z.square().sum()).backward()
    out_r, z_r, *_ = reference.conv_bn_relu(*b)
    (out_r.sum() + z_r.square().sum()).backward()
    for i in (0, 1, 2, 3):
        assert rel_err(a[i].grad, b[i].grad) < 4 * TOL[torch.float32]
    assert spy.kw("conv2d_input_grad")[0]["bn_grad"] is None


def test_relu_mask_at_exact_zeros(spy):
    """bn(z) == 0 exactly (z == running_mean, beta = 0, eval; bn(z) computed as
    z*scale + shift like the primitives): ReLU's gradient there is 0, as autograd's relu.
    The mask is recomputed from z in the backward. (The float64 oracle is no judge at the
    kink: its batch norm rounds to tiny nonzero values there.)"""
    z = torch.randn(2, 6, 5, 5, device=DEV)
    # powers of two: rm*scale is exact, so bn(rm) == 0 exactly with or without an FMA
    rm = torch.tensor([0.5, -1.0, 2.0, -0.25, 1.0, -0.5], device=DEV)
    z[:, :, ::2, 1::2] = rm.view(1, 6, 1, 1)      # a quarter of the values sit at the kink
    z = z.contiguous(memory_format=CL).requires_grad_()
    gamma = (torch.rand(6, device=DEV) + 0.5).requires_grad_()
    beta = torch.zeros(6, device=DEV, requires_grad=True)
    rv = torch.rand(6, device=DEV) + 0.5
    w = (torch.randn(4, 6, 3, 3, device=DEV) / 5).requires_grad_()
    args = [z, gamma, beta, rm, rv, w, [1, 1], [1, 1], [1, 1], 1, False, 1e-5, True]
    outs, grads = _run(ops.bn_relu_conv, clone_args(args))
    assert "relu_mask_" in spy.names()
    ref_outs, ref_grads = _run_on("reference", "bn_relu_conv", args)
    dz = grads[0]
    assert torch.all(dz[:, :, ::2, 1::2] == 0) and torch.all(ref_grads[0][:, :, ::2, 1::2] == 0)
    assert dz.abs().sum() > 0
    for a, b in zip(grads, ref_grads):
        if b is not None:
            assert rel_err(a, b) < 4 * TOL[torch.float32]


# --- fallbacks ------------------------------------------------------------------------------

def _run_on(backend_name, name, args):
    with fused_resnet.use_backend(backend_name):
        return _run(getattr(ops, name), clone_args(args))


@pytest.mark.parametrize("name", list(CASES))
def test_float64_falls_back_to_aten_exactly(spy, name):
    """float64 is not a dtype of the kernels: ATen + the same primitives, bit for bit the
    results of the backend with those primitives (reference; cuda on a GPU when built)."""
    args = _to(_case(name, torch.float64), DEV)
    outs, grads = _run_on("triton", name, args)
    assert spy.calls == []
    same = "cuda" if CUDA and backends.has_compiled_kernel("bn_stats", "cuda") else "reference"
    ref_outs, ref_grads = _run_on(same, name, args)
    for a, b in zip(outs, ref_outs):
        assert torch.equal(a, b)
    for a, b in zip(grads, ref_grads):
        assert (a is None and b is None) or torch.equal(a, b)


def test_nchw_and_interpreted_bf16_fall_back(spy):
    args = _to(_case("bn_relu_conv", torch.float32, fmt=torch.contiguous_format), DEV)
    compare("bn_relu_conv", args, torch.float32)
    assert spy.calls == []
    if K.is_interpreter():
        compare("bn_relu_conv", _to(_case("bn_relu_conv", torch.bfloat16), DEV), torch.bfloat16)
        assert spy.calls == []


def test_conv_impl_heuristic(monkeypatch):
    be = backends.resolve(torch.device(DEV), "triton")
    conv = ConvArgs((1, 1), (1, 1), (1, 1), 1)
    x = torch.randn(2, 8, 5, 5, device=DEV)
    w = torch.randn(4, 8, 3, 3, device=DEV)
    assert be.conv_impl(x.contiguous(memory_format=CL), w, conv) == "triton"
    assert be.conv_impl(x, w, conv) == "aten"                                  # NCHW
    assert be.conv_impl(x.double().contiguous(memory_format=CL), w.double(), conv) == "aten"
    name = triton_backend.conv_name(x.shape, w.shape, conv)
    assert name == "conv_3x3_s1_8_4_5"
    monkeypatch.setitem(triton_backend.MEASURED_CONV_CHOICES, (name, "fp32", "bn_relu_conv"),
                        "aten")
    xc = x.contiguous(memory_format=CL)
    assert be.conv_impl(xc, w, conv, "bn_relu_conv") == "aten"
    assert be.conv_impl(xc, w, conv, "conv") == "triton"


def test_backend_is_available():
    assert "triton" in fused_resnet.available_backends()
    assert backends.unavailable_reason("triton", torch.device(DEV)) is None
    assert backends.resolve(torch.device(DEV), "triton").name == "triton"


# --- opcheck ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["bn_relu_conv", "conv_bias_act"])
def test_opcheck(name):
    opcheck(getattr(ops, name), tuple(_to(_case(name, torch.float32), DEV)))


def test_opcheck_backward_kernel_ops():
    """The Triton backward calls are custom ops with fake kernels, so that the block ops'
    backward traces under torch.compile."""
    x = torch.randn(2, 6, 5, 7, device=DEV).contiguous(memory_format=CL)
    w = torch.randn(4, 6, 3, 3, device=DEV)
    go = torch.randn(2, 4, 3, 4, device=DEV).contiguous(memory_format=CL)
    z, out = torch.randn_like(go), torch.randn_like(go)
    vec = [torch.randn(4, device=DEV) for _ in range(4)]
    geo = ([2, 2], [1, 1], [1, 1], 1)
    sc, sh = torch.rand(6, device=DEV) + 0.5, torch.randn(6, device=DEV)
    f = torch.ops.fused_resnet
    opcheck(f.triton_conv_input_grad, (go, w, list(x.shape), *geo, z, out, *vec))
    opcheck(f.triton_conv_weight_grad, (x, go, w, *geo, sc, sh, True, z, out, *vec))
    opcheck(f.triton_relu_mask_, (x.clone(), x, sc, sh))


# --- the statistics epilogue ---------------------------------------------------------------

def _epilogue_var_error(offset, dtype=torch.float32):
    """Relative errors against float64 of the epilogue's variance, of a two-pass variance
    of the rounded z, and of the one-pass E[z^2] - E[z]^2 from fp32 sums (what an
    epilogue of sums would give), for inputs of mean `offset` and a positive filter (no
    padding, so |mean| / std of z grows with the offset); and min |mean| / std."""
    x = (torch.randn(2, 6, 7, 7, device=DEV) + offset).to(dtype).contiguous(memory_format=CL)
    w = (torch.rand(8, 6, 3, 3, device=DEV) * 0.2 + 0.05).to(dtype)
    z, _, var = K.conv2d(x, w, 1, 0, stats=True)
    n = z.numel() // z.shape[1]
    zf = z.float()
    mean1 = zf.sum((0, 2, 3)) / n
    var1 = (zf.square().sum((0, 2, 3)) / n - mean1 * mean1).clamp_min(0)
    exact = F.conv2d(x.double(), w.double(), None, 1, 0)
    var_exact = exact.var((0, 2, 3), unbiased=False)
    var2 = z.double().var((0, 2, 3), unbiased=False)
    ratio = (exact.mean((0, 2, 3)).abs() / var_exact.sqrt()).min().item()
    return (rel_err(var, var_exact), rel_err(var2, var_exact), rel_err(var1, var_exact),
            ratio)


def _errors(name, args):
    """Relative errors of every output and input gradient against the float64 oracle."""
    outs, grads = _run(getattr(ops, name), clone_args(args))
    ref_outs, ref_grads = _run(getattr(reference, name), clone_args(args, torch.float64))
    errs = {f"out{i}": rel_err(a, b) for i, (a, b) in enumerate(zip(outs, ref_outs))}
    errs.update({f"grad{i}": rel_err(a, b) for i, (a, b) in enumerate(zip(grads, ref_grads))
                 if b is not None})
    return errs


def test_epilogue_stats_accuracy(spy):
    """The epilogue's statistics (per-tile count / mean / M2, merged) are as accurate as a
    two-pass over z, also when |mean| >> std, where a one-pass E[z^2] - E[z]^2 cancels."""
    epi, two, one, ratio = _epilogue_var_error(0.0)
    assert epi < 1e-5 and two < 1e-5, (epi, two, ratio)
    epi_bad, two_bad, one_bad, ratio_bad = _epilogue_var_error(100.0)
    assert ratio_bad > 16, ratio_bad
    assert epi_bad <= 2 * two_bad + 1e-6, (epi_bad, two_bad)
    assert one_bad > 100 * epi_bad, (one_bad, epi_bad)   # the cancellation avoided
    print(f"\nvariance rel. error: |mean|/std >= {ratio:.2g}: epilogue {epi:.2g}, two-pass "
          f"{two:.2g}; |mean|/std >= {ratio_bad:.3g}: epilogue {epi_bad:.2g}, two-pass "
          f"{two_bad:.2g}, one-pass sums {one_bad:.2g}")

    # through the op: as accurate as the reference backend's (two-pass) statistics
    x = (torch.randn(2, 3, 9, 7, device=DEV) + 100).contiguous(memory_format=CL)
    w = torch.rand(5, 3, 3, 3, device=DEV) * 0.2 + 0.05
    gamma, beta = torch.rand(5, device=DEV) + 0.5, torch.randn(5, device=DEV)
    args = [x.requires_grad_(), w.requires_grad_(), gamma.requires_grad_(),
            beta.requires_grad_(), None, None, [1, 1], [0, 0], [1, 1], 1, True, 1e-5, True]
    errs = _errors("conv_bn_relu", args)
    assert spy.kw("conv2d")[-1]["stats"]
    with fused_resnet.use_backend("reference"):
        ref_errs = _errors("conv_bn_relu", args)
    print(f"large-mean conv_bn_relu, output rel. error: triton {errs['out0']:.2g}, "
          f"reference backend {ref_errs['out0']:.2g}")
    for k in ref_errs:
        assert errs[k] <= 2 * ref_errs[k] + 1e-6, (k, errs[k], ref_errs[k])


# --- a tiny full ResNet against torchvision ---------------------------------------------------

def _tiny_resnet():
    """torchvision's ResNet with a narrow stem, one BasicBlock, one BasicBlock with a
    projection shortcut and one Bottleneck (layer4 empty): every fused op of the model."""
    from torchvision.models.resnet import BasicBlock, Bottleneck, conv1x1
    m = torchvision.models.ResNet(BasicBlock, [1, 1, 1, 1], num_classes=5)
    m.conv1 = nn.Conv2d(3, 8, 7, 2, 3, bias=False)
    m.bn1 = nn.BatchNorm2d(8)
    m.layer1 = nn.Sequential(BasicBlock(8, 8))
    m.layer2 = nn.Sequential(BasicBlock(8, 12, 2, nn.Sequential(conv1x1(8, 12, 2),
                                                                nn.BatchNorm2d(12))))
    m.layer3 = nn.Sequential(Bottleneck(12, 3))
    m.layer4 = nn.Identity()
    m.fc = nn.Linear(12, 5)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.normal_(0, 0.5)
                mod.running_mean.normal_(0, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
    return m


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_tiny_resnet_matches_torchvision(spy, mode):
    """fp32 channels_last, forward + every parameter gradient + running statistics: the
    fused model's error against torchvision float64 is within 4x torchvision fp32's."""
    tv64 = _tiny_resnet().double().to(DEV)
    tv32 = copy.deepcopy(tv64).float()
    fr32 = fused_resnet.convert(tv32)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, device=DEV).contiguous(memory_format=CL)
    y = torch.randint(0, 5, (2,), device=DEV)
    results = []
    for model, inp in ((tv64, x), (tv32, x.float()), (fr32, x.float())):
        getattr(model, mode)()
        out = model(inp)
        F.cross_entropy(out.double(), y).backward()
        t = {"out": out.detach()}
        t.update({n: p.grad for n, p in model.named_parameters()})
        t.update({n: b for n, b in model.named_buffers() if b.is_floating_point()})
        results.append(t)
    ref, tv_res, fr_res = results
    for k in ref:
        tv_err, fr_err = rel_err(tv_res[k], ref[k]), rel_err(fr_res[k], ref[k])
        assert fr_err <= 4 * tv_err + 1e-5, f"{k}: fused {fr_err:.3g}, torchvision {tv_err:.3g}"
    names = spy.names()
    assert "conv2d" in names and "conv2d_weight_grad" in names
    if mode == "train":
        assert any(k.get("stats") for n, k in spy.calls if n == "conv2d")
        assert any(k.get("in_scale") is not None for n, k in spy.calls if n == "conv2d")
    else:
        # eval with gradients runs the unfolded eval-mode ops (fused_resnet.nn.use_folded);
        # inference (no grad) runs the BN-folded convs with the bias epilogue
        assert any(k.get("in_scale") is not None for n, k in spy.calls if n == "conv2d")
        spy.calls.clear()
        with torch.no_grad():
            inferred = fr32(x.float())
        assert rel_err(inferred, ref["out"]) <= 4 * rel_err(tv_res["out"], ref["out"]) + 1e-5
        assert any(k.get("bias") is not None for n, k in spy.calls if n == "conv2d")


# --- GPU: bf16 / fp16 and ResNet-50 under autocast ------------------------------------------

gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_gpu_op_matches_reference(spy, name, dtype, training):
    if name == "conv_bias_act" and not training:
        pytest.skip("conv_bias_act has no training mode")
    outs, _, _ = compare(name, _to(_case(name, dtype, training), "cuda"), dtype)
    assert outs[0].is_contiguous(memory_format=CL)
    _check_fusions(spy, name, training)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_gpu_resnet50_bf16_autocast_error_like_eager(spy, mode):
    """ResNet-50 under CUDA bf16 autocast, channels_last: the fused (Triton) model's
    output and parameter gradients against an fp32 reference (TF32 off) are no worse than
    1.5x eager bf16's (plus a floor of one bf16 rounding, as tests/test_models.py)."""
    torch.manual_seed(0)
    tv = torchvision.models.resnet50(num_classes=10).cuda().to(memory_format=CL)
    with torch.no_grad():
        for m in tv.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.5)
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    fr = fused_resnet.convert(tv)
    x = torch.randn(8, 3, 64, 64, device="cuda").contiguous(memory_format=CL)
    y = torch.randint(0, 10, (8,), device="cuda")

    def run(model, autocast):
        model = copy.deepcopy(model)
        getattr(model, mode)()
        with torch.autocast("cuda", torch.bfloat16, enabled=autocast):
            out = model(x)
        F.cross_entropy(out.float(), y).backward()
        grads = {n: p.grad.float() for n, p in model.named_parameters()}
        return out.float().detach(), grads

    ref_out, ref_grads = run(tv, False)
    eager_out, eager_grads = run(tv, True)
    fused_out, fused_grads = run(fr, True)
    assert rel_err(fused_out, ref_out) <= 1.5 * rel_err(eager_out, ref_out) + 4e-3
    eager_g = max(rel_err(eager_grads[n], ref_grads[n]) for n in ref_grads)
    fused_g = max(rel_err(fused_grads[n], ref_grads[n]) for n in ref_grads)
    assert fused_g <= 1.5 * eager_g + 4e-3, (fused_g, eager_g)
    assert "conv2d" in spy.names()
