"""The paper's model family: CIFAR ResNets 20-1202, shortcut options A/B/C, plain nets.

- parameter counts against the paper's CIFAR-10 table;
- every variant (A, B, C, None) of the CIFAR ResNet and of ResNet-18/34 against a
  straightforward PyTorch implementation written here (nn.Conv2d / nn.BatchNorm2d /
  F.relu, option A with F.pad): float64, train and eval, output, input gradient, every
  parameter gradient and every running statistic, on each CPU backend;
- the running statistics of an option-A block against nn.BatchNorm2d's.
The option-A operator itself: tests/ops/test_option_a.py; the degradation experiment:
tests/tools/test_degradation.py.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fused_resnet
from fused_resnet.backends import has_compiled_kernel
from conftest import CPU_BACKENDS, rel_err


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


def test_running_stats_through_block_match_batchnorm():
    """Three training steps of an option-A block: running stats as nn.BatchNorm2d's."""
    fused, ref = _models("cifar_resnet20", "A")
    for _ in range(3):
        x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
        fused.train()(x)
        ref.train()(x)
    for (name, a), (_, b) in zip(fused.named_buffers(), ref.named_buffers()):
        assert rel_err(a, b) < 1e-12, name


# --- CUDA (skipped without a GPU) ----------------------------------------------------------

CUDA_OPTION_A = (torch.cuda.is_available() and "cuda" in fused_resnet.available_backends()
                 and has_compiled_kernel("bn_apply_option_a", "cuda"))


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
