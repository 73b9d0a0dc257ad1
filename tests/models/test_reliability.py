"""What real users do to a model, against torchvision doing the same: in-place updates
that bypass version counters, attribute changes, replaced activations and hooks, empty
batches, bad eps, double backward, threads with their own backend, saving, scripting,
torch.func. Each case is compared with torchvision where torchvision defines it."""
import copy
import io
import pickle
import subprocess
import sys
import threading

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import fused_resnet
from conftest import CPU_BACKENDS, rel_err

BEST_CPU_BACKEND = CPU_BACKENDS[-1]


def _pair(name="resnet18", dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    tv = getattr(torchvision.models, name)(num_classes=7).to(dtype)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in tv.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g, dtype=dtype) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g, dtype=dtype) * 0.2)
                m.running_mean.copy_(torch.randn(m.num_features, generator=g, dtype=dtype) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g, dtype=dtype) + 0.5)
    return tv, fused_resnet.convert(tv)


def _x(n=2, dtype=torch.float64, hw=32):
    return torch.randn(n, 3, hw, hw, dtype=dtype)


# --- eval mode computes what the current parameters, buffers and attributes give ----------

EVAL_UPDATES = {
    # the EMA / momentum-encoder update, through .data (no version bump)
    "ema_through_data": lambda m: [p.data.mul_(0.9).add_(0.1 * torch.ones_like(p))
                                   for p in m.parameters()],
    "bn_bias_data": lambda m: m.layer1[0].bn1.bias.data.add_(0.5),
    "running_mean_data": lambda m: m.layer2[0].bn2.running_mean.data.add_(0.3),
    "bn_eps": lambda m: setattr(m.layer3[1].bn1, "eps", 0.5),
    "load_state_dict": lambda m: m.load_state_dict(
        {k: v * 1.01 if v.is_floating_point() else v for k, v in m.state_dict().items()}),
}


@pytest.mark.parametrize("update", list(EVAL_UPDATES))
def test_eval_sees_every_change(backend, update):
    tv, fr = _pair()
    tv.eval()
    fr.eval()
    x = _x()
    with torch.no_grad():
        fr(x)                      # a first inference, before the change
        for m in (tv, fr):
            EVAL_UPDATES[update](m)
        assert rel_err(fr(x), tv(x)) < 1e-12


def test_saved_model_is_as_large_as_torchvisions():
    tv, fr = _pair(dtype=torch.float32)
    tv.eval()
    fr.eval()
    with torch.no_grad():
        fr(_x(dtype=torch.float32))     # inference must leave nothing behind on the modules
    sizes = []
    for m in (tv, fr):
        buf = io.BytesIO()
        torch.save(m, buf)
        sizes.append(buf.tell())
    assert sizes[1] < 1.01 * sizes[0], sizes
    assert len(pickle.dumps(fr)) < 1.01 * len(pickle.dumps(tv))
    clone = copy.deepcopy(fr)
    assert sum(t.numel() for t in clone.state_dict().values()) == \
        sum(t.numel() for t in tv.state_dict().values())


# --- what cannot be fused is refused, at convert and at forward ------------------------------

def test_convert_refuses_a_replaced_activation():
    tv, _ = _pair()
    tv.relu = nn.SiLU()
    with pytest.raises(ValueError, match=r"ResNet\.relu.*SiLU"):
        fused_resnet.convert(tv)
    tv, _ = _pair()
    tv.layer2[1].relu = nn.LeakyReLU(0.1)
    with pytest.raises(ValueError, match=r"BasicBlock\.relu.*LeakyReLU"):
        fused_resnet.convert(tv)


def test_forward_refuses_what_was_replaced_after_construction():
    model = fused_resnet.resnet18(num_classes=7)
    model.layer1[0].relu = nn.GELU()
    with pytest.raises(ValueError, match=r"BasicBlock\.relu.*GELU"):
        model(_x(dtype=torch.float32))
    model = fused_resnet.resnet18(num_classes=7)
    model.layer3[0].conv2.bias = nn.Parameter(torch.zeros(256))
    with pytest.raises(ValueError, match=r"BasicBlock\.conv2.*bias-free"):
        model(_x(dtype=torch.float32))
    model = fused_resnet.resnet50(num_classes=7)
    model.layer1[0].bn3 = nn.GroupNorm(4, 256)
    with pytest.raises(ValueError, match=r"Bottleneck\.bn3.*GroupNorm"):
        model.eval()(_x(dtype=torch.float32))


def test_hooks_on_fused_submodules_are_refused():
    model = fused_resnet.resnet18(num_classes=7)
    seen = []
    model.layer1[0].bn1.register_forward_hook(lambda m, i, o: seen.append(o))
    with pytest.raises(ValueError, match=r"BasicBlock\.bn1 has forward hooks"):
        model(_x(dtype=torch.float32))
    # a hook on the block itself runs as usual
    model = fused_resnet.resnet18(num_classes=7)
    model.layer1[0].register_forward_hook(lambda m, i, o: seen.append(o))
    model(_x(dtype=torch.float32))
    assert len(seen) == 1


def test_other_replacements_are_honoured():
    """Modules the fused forward calls as modules keep working when replaced."""
    tv, fr = _pair()
    for m in (tv, fr):
        m.maxpool = nn.Identity()
        m.fc = nn.Identity()
        m.layer2[0].downsample = nn.Sequential(nn.AvgPool2d(2), nn.Conv2d(64, 128, 1,
                                                                            dtype=torch.float64))
    fr.layer2[0].downsample.load_state_dict(tv.layer2[0].downsample.state_dict())
    x = _x()
    for train in (True, False):
        tv.train(train)
        fr.train(train)
        assert rel_err(fr(x), tv(x)) < 1e-12


# --- batch-norm edge cases, as torchvision -----------------------------------------------------

def test_empty_batch_in_training(backend):
    tv, fr = _pair()
    before = copy.deepcopy(fr.state_dict())
    x = _x(n=0).requires_grad_()
    out_tv, out = tv.train()(x), fr.train()(x)
    assert out.shape == out_tv.shape == (0, 7)
    out.sum().backward()
    for (k, a), b in zip(fr.state_dict().items(), tv.state_dict().values()):
        assert torch.equal(a, b), k        # running stats untouched, counters counted
        if k.endswith("num_batches_tracked"):
            assert a == before[k] + 1
    for p in fr.parameters():
        assert p.grad is None or not p.grad.any()


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("eps", [0.0, -1e-5])
def test_bad_eps_like_torchvision(eps, train):
    """Training needs eps > 0, eval eps >= 0: the same ValueError as torchvision's, or
    the same output where torchvision accepts it."""
    tv, fr = _pair()
    for m in (tv, fr):
        m.layer1[0].bn1.eps = eps
        m.train(train)
    x = _x()
    try:
        with torch.no_grad():
            want = tv(x)
    except ValueError as err:
        with pytest.raises(ValueError) as got:
            fr(x)
        assert str(got.value) == str(err)
    else:
        with torch.no_grad():
            assert rel_err(fr(x), want) < 1e-12


# --- double backward is refused, first-order gradients with create_graph stay right -----------

def _penalty(model, x):
    x = x.clone().requires_grad_()
    out = model(x).square().sum()
    (gx,) = torch.autograd.grad(out, x, create_graph=True)
    return gx


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_double_backward_is_refused(backend, train):
    tv, fr = _pair()
    tv.train(train)
    fr.train(train)
    x = _x()
    gx, gx_tv = _penalty(fr, x), _penalty(tv, x)
    assert rel_err(gx, gx_tv) < 1e-9           # the first-order gradient is right
    with pytest.raises(RuntimeError, match="differentiable once"):
        gx.square().sum().backward()


# --- backend choice is per thread --------------------------------------------------------------

def test_use_backend_is_per_thread():
    names = [b for b in ("reference", "cpu") if b in fused_resnet.available_backends()]
    if len(names) < 2:
        pytest.skip("needs two CPU backends")
    default = fused_resnet.get_backend()
    barrier = threading.Barrier(2)
    seen = {}

    def work(name):
        with fused_resnet.use_backend(name):
            barrier.wait()                  # both threads are inside their block now
            seen[name] = fused_resnet.get_backend()
            barrier.wait()

    threads = [threading.Thread(target=work, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {n: n for n in names}
    assert fused_resnet.get_backend() == default


def test_set_backend_is_the_default_of_every_thread():
    default = fused_resnet.get_backend()
    seen = []
    try:
        fused_resnet.set_backend("reference")
        t = threading.Thread(target=lambda: seen.append(fused_resnet.get_backend()))
        t.start()
        t.join()
    finally:
        fused_resnet.set_backend(default)
    assert seen == ["reference"]


def test_bad_backend_variable_names_the_variable():
    code = ("import fused_resnet, torch\n"
            "try:\n"
            "    fused_resnet.resnet18()(torch.randn(2, 3, 32, 32))\n"
            "except ValueError as e:\n"
            "    print('ERR', e)\n")
    env = {**__import__("os").environ, "FUSED_RESNET_BACKEND": "gpu"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr     # importing works
    assert "ERR" in proc.stdout and "FUSED_RESNET_BACKEND='gpu'" in proc.stdout


# --- scripting, torch.func ---------------------------------------------------------------------

def test_script_is_refused_clearly():
    model = fused_resnet.resnet18(num_classes=7)
    with pytest.raises(RuntimeError, match="torch.jit.script does not support.*torch.compile"):
        torch.jit.script(model)
    model = model.double().eval()
    traced = torch.jit.trace(model, _x(), check_trace=False)
    x = _x()
    with torch.no_grad():
        assert rel_err(traced(x), model(x)) < 1e-12


def test_torch_func_per_sample_gradients_like_torchvision():
    """vmap(grad) per-sample gradients in eval mode, as torchvision supports them."""
    tv, fr = _pair()
    x = _x(n=3)
    y = torch.tensor([1, 4, 6])
    results = []
    for m in (tv, fr):
        m.eval()
        params = {k: v.detach() for k, v in m.named_parameters()}
        buffers = dict(m.named_buffers())

        def loss(p, xi, yi, m=m):
            out = torch.func.functional_call(m, (p, buffers), (xi[None],))
            return F.cross_entropy(out, yi[None])

        results.append(torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(
            params, x, y))
    for k in results[0]:
        assert rel_err(results[1][k], results[0][k]) < 1e-12, k
    jac = torch.func.jacrev(lambda xx: fr(xx).sum(0))(x)
    jac_tv = torch.func.jacrev(lambda xx: tv(xx).sum(0))(x)
    assert rel_err(jac, jac_tv) < 1e-12
