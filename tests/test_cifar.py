"""The paper's model family: CIFAR ResNets 20-1202, shortcut options A/B/C, plain nets.

- parameter counts against the paper's CIFAR-10 table;
- every variant (A, B, C, None) of the CIFAR ResNet and of ResNet-18/34 against a
  straightforward PyTorch implementation written here (nn.Conv2d / nn.BatchNorm2d /
  F.relu, option A with F.pad): float64, train and eval, output, input gradient, every
  parameter gradient and every running statistic, on each CPU backend;
- the option-A operator at odd spatial sizes against an eager oracle (every dtype, both
  memory formats), its compiled primitives against the plain-PyTorch ones when built,
  opcheck and float64 gradcheck;
- the degradation experiment (a few steps).
"""
import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.library import opcheck

import fused_resnet
from fused_resnet import option_a
from conftest import CPU_BACKENDS, TOL, rel_err

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
FORMATS = [torch.contiguous_format, torch.channels_last]
COMPILED = hasattr(torch.ops.fused_resnet, "bn_apply_option_a") and option_a.has_compiled_kernel("cpu")


# --- parameter counts -----------------------------------------------------------------------

PAPER_PARAMS = {20: 0.27, 32: 0.46, 44: 0.66, 56: 0.85, 110: 1.7, 1202: 19.4}  # millions


def _count(model):
    return sum(p.numel() for p in model.parameters())


def _paper_rounding(n):
    """As the paper's table: two decimals below 1M, one above."""
    m = n / 1e6
    return round(m, 2) if m < 1 else round(m, 1)


@pytest.mark.parametrize("depth", list(PAPER_PARAMS))
def test_parameter_counts_match_paper(depth):
    model = getattr(fused_resnet, f"cifar_resnet{depth}")()
    n = (depth - 2) // 6
    assert _paper_rounding(_count(model)) == PAPER_PARAMS[depth]
    # 6n + 2 weighted layers: stem, 2 per block, fc; option A adds none
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) + 1 == depth == 6 * n + 2
    assert model.shortcut == "A" and model.depth == depth


def test_shortcut_options_parameter_counts():
    a = _count(fused_resnet.cifar_resnet20())
    assert _count(fused_resnet.cifar_resnet20(shortcut=None)) == a  # plain: same layers
    # B: two 1x1 projections + BN (16->32, 32->64); C: a projection in every block
    assert _count(fused_resnet.cifar_resnet20(shortcut="B")) == a + 16 * 32 + 64 + 32 * 64 + 128
    c = sum(cin * cout + 2 * cout for cin, cout in [(16, 16)] * 3 + [(16, 32)] + [(32, 32)] * 2
            + [(32, 64)] + [(64, 64)] * 2)
    assert _count(fused_resnet.cifar_resnet20(shortcut="C")) == a + c
    # ResNet-18/34 B are torchvision's, parameter for parameter, key for key
    from torchvision.models import resnet18, resnet34
    for fused, tv in ((fused_resnet.resnet18, resnet18), (fused_resnet.resnet34, resnet34)):
        f, t = fused(), tv()
        assert list(f.state_dict()) == list(t.state_dict()) and _count(f) == _count(t)
        plain, opt_a = fused(shortcut=None), fused(shortcut="A")
        assert not any("downsample" in k for k in list(plain.state_dict()) + list(opt_a.state_dict()))
        assert _count(plain) == _count(opt_a) == _count(t) - sum(
            p.numel() for k, p in t.named_parameters() if "downsample" in k)
        blocks = [m for m in fused(shortcut="C").modules() if isinstance(m, fused_resnet.BasicBlock)]
        assert all(isinstance(b.downsample, nn.Sequential) for b in blocks)


def test_shortcut_errors():
    with pytest.raises(ValueError, match="shortcut must be"):
        fused_resnet.cifar_resnet20(shortcut="D")
    with pytest.raises(ValueError, match="shortcut must be"):
        fused_resnet.resnet18(shortcut="identity")
    with pytest.raises(ValueError, match="basic-block"):
        fused_resnet.resnet50(shortcut="A")
    assert fused_resnet.resnet50(shortcut="B") is not None


# --- a straightforward PyTorch implementation of the same networks ------------------------

class RefOptionA(nn.Module):
    def __init__(self, planes, stride):
        super().__init__()
        self.planes, self.stride = planes, stride

    def forward(self, x):
        s = x[:, :, ::self.stride, ::self.stride]
        return F.pad(s, (0, 0, 0, 0, 0, self.planes - x.shape[1]))


class RefBlock(nn.Module):
    def __init__(self, inplanes, planes, stride, option):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.option = option
        changes = stride != 1 or inplanes != planes
        if option == "C" or (option == "B" and changes):
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False),
                                            nn.BatchNorm2d(planes))
        elif option == "A" and changes:
            self.downsample = RefOptionA(planes, stride)
        else:
            self.downsample = None

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.option is not None:  # None: the plain network
            out = out + (x if self.downsample is None else self.downsample(x))
        return F.relu(out)


class RefResNet(nn.Module):
    """cifar=True: 3x3/16 stem, stages 16/32/64; else the ImageNet ResNet-18/34 layout."""

    def __init__(self, layers, option, cifar, num_classes=10):
        super().__init__()
        widths = (16, 32, 64) if cifar else (64, 128, 256, 512)
        self.cifar = cifar
        self.conv1 = (nn.Conv2d(3, 16, 3, 1, 1, bias=False) if cifar
                      else nn.Conv2d(3, 64, 7, 2, 3, bias=False))
        self.bn1 = nn.BatchNorm2d(widths[0])
        inplanes = widths[0]
        for i, (w, n) in enumerate(zip(widths, layers)):
            blocks = []
            for j in range(n):
                blocks.append(RefBlock(inplanes, w, 2 if (i > 0 and j == 0) else 1, option))
                inplanes = w
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        if not self.cifar:
            x = F.max_pool2d(x, 3, 2, 1)
        for i in range(1, 5 if not self.cifar else 4):
            x = getattr(self, f"layer{i}")(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# name: (fused constructor, ref layers, cifar?, input [N, C, H, W]); odd sizes on purpose
NETS = {
    "cifar_resnet20": (fused_resnet.cifar_resnet20, [3, 3, 3], True, (3, 3, 15, 13)),
    "resnet18": (fused_resnet.resnet18, [2, 2, 2, 2], False, (2, 3, 35, 27)),
    "resnet34": (fused_resnet.resnet34, [3, 4, 6, 3], False, (2, 3, 33, 31)),
}
OPTIONS = ["A", "B", "C", None]


def _randomise(model):
    """Random BN affine parameters and running statistics, random fc bias."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.3)
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(3)
            elif isinstance(m, nn.Linear):
                m.bias.normal_()


def _models(net, option):
    """(fused, ref): float64 models with the same random parameters and buffers."""
    build, layers, cifar, _ = NETS[net]
    torch.manual_seed(1234)
    fused = build(shortcut=option, num_classes=10).double()
    _randomise(fused)
    ref = RefResNet(layers, option, cifar).double()
    ref.load_state_dict(fused.state_dict(), strict=True)  # same names, same structure
    return fused, ref


class _Reusable:
    """The models of the last (net, option), reset between uses instead of rebuilt or
    deep-copied (ResNet-34 in float64 is 170 MB a copy): only gradients and buffers
    change in a forward/backward without an optimizer step."""
    key = models = buffers = None

    @classmethod
    def get(cls, net, option):
        if cls.key != (net, option):
            cls.key, cls.models = None, None  # free the previous ones first
            cls.models = _models(net, option)
            cls.buffers = [{k: b.clone() for k, b in m.named_buffers()} for m in cls.models]
            cls.key = (net, option)
        cls.reset(0)
        cls.reset(1)
        return cls.models

    @classmethod
    def reset(cls, i):
        """Model i (0: fused, 1: ref) back to its initial gradients (none) and buffers."""
        model = cls.models[i]
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            for k, b in model.named_buffers():
                b.copy_(cls.buffers[i][k])
        return model


@pytest.fixture(scope="module", autouse=True)
def _free_models():
    yield
    _Reusable.key = _Reusable.models = _Reusable.buffers = None


def _run(model, x, g):
    x = x.clone().requires_grad_()
    y = model(x)
    (y * g).sum().backward()
    return y, x.grad


# grouped by (net, option) so that each pair of models is built once
MODEL_CASES = [(net, option, training) for net in NETS for option in OPTIONS
               for training in (True, False)]


@pytest.mark.parametrize("net,option,training", MODEL_CASES,
                         ids=[f"{n}-opt{o}-{'train' if t else 'eval'}" for n, o, t in MODEL_CASES])
def test_model_matches_plain_pytorch(net, option, training):
    """Each CPU backend against one run of the plain implementation: output, input
    gradient, every parameter gradient and every buffer (running statistics)."""
    fused, ref = _Reusable.get(net, option)
    ref.train(training)
    x = torch.randn(NETS[net][3], dtype=torch.float64)
    g = torch.randn(x.shape[0], 10, dtype=torch.float64)
    y_ref, dx_ref = _run(ref, x, g)
    ref_grads = {k: p.grad for k, p in ref.named_parameters()}
    ref_buffers = {k: b.clone() for k, b in ref.named_buffers()}
    tol = 1e-8  # float64 through 20-36 layers of batch norm on tiny batches
    for backend in CPU_BACKENDS:
        fused = _Reusable.reset(0)  # fresh gradients and running statistics
        fused.train(training)
        with fused_resnet.use_backend(backend):
            y, dx = _run(fused, x, g)
        assert rel_err(y, y_ref) < tol, backend
        assert rel_err(dx, dx_ref) < tol, backend
        params, buffers = dict(fused.named_parameters()), dict(fused.named_buffers())
        assert list(params) == list(ref_grads) and list(buffers) == list(ref_buffers)
        for name, p in params.items():
            assert p.grad is not None, (backend, name)
            assert rel_err(p.grad, ref_grads[name]) < tol, (backend, name)
        for name, b in buffers.items():  # running stats moved in training, untouched in eval
            assert rel_err(b, ref_buffers[name]) < 1e-12, (backend, name)


@pytest.mark.parametrize("option", ["A", None], ids=["optA", "plain"])
def test_to_torchvision_keeps_option_a_and_plain(option):
    """The shortcut modules compute option A / no shortcut also as plain modules."""
    fused, ref = _models("cifar_resnet20", option)
    x = torch.randn(2, 3, 9, 11, dtype=torch.float64)
    tv = fused_resnet.to_torchvision(fused)
    for training in (True, False):  # train (updates both models' stats), then eval
        tv.train(training)
        assert rel_err(tv(x), ref.train(training)(x)) < 1e-10


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
    outs = option_a.bn_add_relu_option_a(*a)
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
    option_a.bn_add_relu_option_a(*a)[0].sum().backward()
    _oracle(*b)[0].sum().backward()
    torch.testing.assert_close(a[5].grad, b[5].grad, equal_nan=True)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "nhwc"])
def test_option_a_opcheck(backend, fmt, training):
    for dtype in (torch.float64, torch.float32):
        opcheck(option_a.bn_add_relu_option_a,
                tuple(_case((2, 3, 5, 7, 5, 2), dtype, fmt, training)))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_option_a_gradcheck(backend, training):
    args = _case((2, 2, 3, 5, 3, 2), torch.float64, torch.channels_last, training)
    diff = (0, 1, 2, 5)

    def f(z, gamma, beta, x):
        full = list(args)
        full[0], full[1], full[2], full[5] = z, gamma, beta, x
        return option_a.bn_add_relu_option_a(*full)[0]

    inputs = tuple(args[i].detach().clone().requires_grad_() for i in diff)
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_option_a_errors(backend):
    z = torch.randn(2, 8, 4, 4)
    gamma, beta = torch.ones(8), torch.zeros(8)
    op = option_a.bn_add_relu_option_a
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


def test_running_stats_through_block_match_batchnorm():
    """Three training steps of an option-A block: running stats as nn.BatchNorm2d's."""
    fused, ref = _models("cifar_resnet20", "A")
    for _ in range(3):
        x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
        fused.train()(x)
        ref.train()(x)
    for (name, a), (_, b) in zip(fused.named_buffers(), ref.named_buffers()):
        assert rel_err(a, b) < 1e-12, name


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
        ref = option_a.bn_apply_option_a(z, scale, shift, x, s, relu)
        got = torch.ops.fused_resnet.bn_apply_option_a(z, scale, shift, x, s, relu)
        assert got.dtype == dtype and got.stride() == ref.stride()
        assert rel_err(got, ref) < TOL[dtype] / 4
    out = ref
    for mask in (out, None):
        refs = option_a.bn_backward_apply_option_a(go, mask, z, mean, a, b, d, list(x.shape), s)
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
    assert option_a.has_compiled_kernel("cpu") == COMPILED
    # with or without the kernels, the cpu backend computes option A
    args = _case((2, 3, 6, 7, 9, 2), torch.float64, torch.contiguous_format)
    with fused_resnet.use_backend("cpu"):
        assert backends.resolve(torch.device("cpu")).name == "cpu"
        _compare(args, torch.float64)


# --- the degradation experiment --------------------------------------------------------------

def test_degradation_experiment_runs(tmp_path):
    from fused_resnet.degradation import run_degradation
    result = run_degradation("cifar_resnet20", steps=2, batch_size=8, out_dir=tmp_path,
                             progress=False, final_eval_images=32)
    saved = json.loads((tmp_path / "degradation_cifar_resnet20.json").read_text())
    assert set(saved["curves"]) == {"plain", "residual"}
    for name, curve in saved["curves"].items():
        assert len(curve["train_error"]) == len(curve["loss"]) == 2
        assert 0 <= curve["final_train_error"] <= 100
    assert saved["curves"]["plain"]["shortcut"] is None
    assert saved["curves"]["residual"]["shortcut"] == "A"
    assert saved["curves"]["plain"]["parameters"] == saved["curves"]["residual"]["parameters"]
    if result["png"] is not None:
        assert (tmp_path / "degradation_cifar_resnet20.png").stat().st_size > 1000


def test_train_compare_plain_calls_the_experiment(monkeypatch, tmp_path):
    """`python -m fused_resnet train --model M --compare-plain` runs run_degradation."""
    import importlib.util
    if importlib.util.find_spec("fused_resnet.train") is None:
        pytest.skip("no train subcommand in this installation")
    from fused_resnet import cli, degradation
    calls = []

    def fake(model_name, **kwargs):
        calls.append((model_name, kwargs))
        return {"fake": True}

    monkeypatch.setattr(degradation, "run_degradation", fake)
    monkeypatch.setattr(degradation, "summary", lambda result: "summary")
    code = cli.main(["train", "--model", "cifar_resnet56", "--compare-plain", "--steps", "5",
                     "--batch", "16", "--out", str(tmp_path), "--quiet", "--device", "cpu"])
    assert code == 0
    assert calls and calls[0][0] == "cifar_resnet56"
    kwargs = calls[0][1]
    assert kwargs["steps"] == 5 and kwargs["batch_size"] == 16
    assert str(kwargs["out_dir"]) == str(tmp_path) and kwargs["device"] == "cpu"


# --- CUDA (skipped without a GPU; the kernels of csrc/cuda/option_a.cu) ---------------------

CUDA_OPTION_A = (torch.cuda.is_available() and "cuda" in fused_resnet.available_backends()
                 and option_a.has_compiled_kernel("cuda"))


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
        ref = option_a.bn_apply_option_a(z, vecs[0], vecs[1], x, s, relu)
        got = torch.ops.fused_resnet.bn_apply_option_a(*cu(z, vecs[0], vecs[1], x), s, relu)
        assert got.dtype == dtype and got.stride() == ref.stride()
        assert rel_err(got.cpu(), ref) < TOL[dtype] / 4
    for mask in (ref, None):
        refs = option_a.bn_backward_apply_option_a(go, mask, z, *vecs[2:], list(x.shape), s)
        gots = torch.ops.fused_resnet.bn_backward_apply_option_a(
            go.cuda(), None if mask is None else mask.cuda(), *cu(z, *vecs[2:]), list(x.shape), s)
        for r, g in zip(refs, gots):
            assert g.shape == r.shape and g.stride() == r.stride()
            assert rel_err(g.cpu(), r) < TOL[dtype] / 4


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA_OPTION_A, reason="needs a GPU and the CUDA option-A kernels")
@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: f"opt{o}")
def test_cuda_cifar_resnet_matches_plain_pytorch(option):
    fused, ref = _models("cifar_resnet20", option)
    fused, ref = fused.cuda(), ref.cuda()
    x = torch.randn(4, 3, 17, 15, dtype=torch.float64, device="cuda")
    g = torch.randn(4, 10, dtype=torch.float64, device="cuda")
    for training in (True, False):
        fused.train(training)
        ref.train(training)
        with fused_resnet.use_backend("cuda"):
            y, dx = _run(fused, x, g)
        y_ref, dx_ref = _run(ref, x, g)
        assert rel_err(y, y_ref) < 1e-8 and rel_err(dx, dx_ref) < 1e-8
        for (name, p), q in zip(fused.named_parameters(), ref.parameters()):
            assert rel_err(p.grad, q.grad) < 1e-8, name
        fused.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)
