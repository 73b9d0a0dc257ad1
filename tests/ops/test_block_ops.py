"""Every fused block operator against the plain-PyTorch oracle (fused_resnet.testing.reference):
forward outputs, batch statistics and every input gradient, on fresh random inputs,
odd shapes, both memory formats, every dtype, and for each backend that runs on CPU;
plus opcheck, float64 gradcheck, the running-stat update and the errors."""
import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import fused_resnet
from fused_resnet import ops
from fused_resnet.testing import reference
from conftest import CPU_BACKENDS, TOL, rel_err
from op_cases import (CASES, DTYPES, FORMATS, as_tuple, bn_params, case_bn_add_relu,
                      case_bn_relu_conv, case_conv_bias_act, case_conv_bn_relu, clone_args)


def _run(fn, args, grad_seed=1):
    """Forward, then backward of a random linear function of the main output."""
    outs = as_tuple(fn(*args))
    g = torch.Generator().manual_seed(grad_seed)
    weight = torch.randn(outs[0].shape, generator=g, dtype=torch.float64)
    (outs[0].double() * weight).sum().backward()
    grads = [a.grad if isinstance(a, torch.Tensor) and a.requires_grad else None for a in args]
    return outs, grads


def _compare(name, args, dtype):
    fused_args = clone_args(args)
    oracle_args = clone_args(args, torch.float64)    # the oracle sees the same rounded inputs
    outs, grads = _run(getattr(ops, name), fused_args)
    ref_outs, ref_grads = _run(getattr(reference, name), oracle_args)
    tol = TOL[dtype]
    assert outs[0].dtype == dtype
    for i, (a, b) in enumerate(zip(outs, ref_outs)):
        if b.numel():
            assert rel_err(a, b) < tol, f"{name} output {i}: {rel_err(a, b):.3g} >= {tol}"
    for i, (a, b) in enumerate(zip(grads, ref_grads)):
        if b is None:
            continue
        assert a is not None, f"{name}: no gradient for argument {i}"
        assert a.dtype == args[i].dtype and a.shape == args[i].shape
        # gradients pass through one more rounded layer (the backward conv) than outputs
        assert rel_err(a, b) < 4 * tol, f"{name} grad of arg {i}: {rel_err(a, b):.3g}"
    return outs


@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_op_matches_reference(backend, name, dtype, fmt):
    args = CASES[name](dtype, fmt)
    outs = _compare(name, args, dtype)
    if fmt == torch.channels_last:
        assert outs[0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("variant", ["identity", "projection", "none"])
def test_bn_add_relu_variants(backend, variant, training):
    args = case_bn_add_relu(torch.float64, torch.channels_last, training,
                            projection=variant == "projection", identity=variant == "identity")
    _compare("bn_add_relu", args, torch.float64)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("conv", [dict(k=1, stride=2), dict(k=3, stride=2), dict(k=3, groups=2),
                                  dict(k=3, dilation=2), dict(k=1, stride=1)],
                         ids=["1x1s2", "3x3s2", "3x3g2", "3x3d2", "1x1s1"])
def test_bn_relu_conv_geometry(backend, conv, training):
    _compare("bn_relu_conv", case_bn_relu_conv(torch.float64, torch.contiguous_format, training,
                                               **conv), torch.float64)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "norelu"])
def test_conv_bn_relu_modes(backend, training, relu):
    _compare("conv_bn_relu", case_conv_bn_relu(torch.float64, torch.channels_last, training,
                                               stride=1, relu=relu), torch.float64)


@pytest.mark.parametrize("residual,relu", [(False, True), (True, False), (False, False)])
def test_conv_bias_act_modes(backend, residual, relu):
    _compare("conv_bias_act", case_conv_bias_act(torch.float64, torch.contiguous_format,
                                                 residual, relu, stride=1), torch.float64)


def test_gradient_through_returned_conv_output(backend):
    """conv_bn_relu also returns z; a loss on z must reach x and the weight."""
    args = case_conv_bn_relu(torch.float64, torch.contiguous_format)
    a, b = clone_args(args), clone_args(args)
    out, z, *_ = ops.conv_bn_relu(*a)
    (out.sum() + z.square().sum()).backward()
    out_r, z_r, *_ = reference.conv_bn_relu(*b)
    (out_r.sum() + z_r.square().sum()).backward()
    for i in (0, 1, 2, 3):
        assert rel_err(a[i].grad, b[i].grad) < 1e-10


def test_large_mean_statistics(backend):
    """Data with a mean far from zero: the statistics must not cancel (sum of squares),
    and the output may lose no more than eager's own float32 batch norm loses."""
    z = torch.randn(4, 8, 9, 9) * 0.1 + 100.0
    gamma, beta, rm, rv = bn_params(8)
    w = torch.eye(8).reshape(8, 8, 1, 1)  # identity conv: the output is relu(bn(z))
    out, mean, var, _, _ = ops.bn_relu_conv(z, gamma, beta, rm, rv, w, [1, 1], [0, 0], [1, 1],
                                            1, True, 1e-5, True)
    zd = z.double()
    assert rel_err(mean, zd.mean((0, 2, 3))) < 1e-7
    assert rel_err(var, zd.var((0, 2, 3), unbiased=False)) < 1e-5
    exact = F.relu(F.batch_norm(zd, None, None, gamma.double(), beta.double(), True, 0.0, 1e-5))
    eager = F.relu(F.batch_norm(z, None, None, gamma, beta, True, 0.0, 1e-5))
    assert rel_err(out, exact) <= 2 * rel_err(eager, exact) + 1e-6


# --- torch.library.opcheck and gradcheck ---------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_opcheck(backend, name, dtype):
    args = CASES[name](dtype, torch.channels_last)
    opcheck(getattr(ops, name), tuple(args))


def test_opcheck_update_running_stats(backend):
    two = [torch.randn(5), torch.randn(3, dtype=torch.float64)]
    args = ([t.clone() for t in two], [t.abs() + 0.5 for t in two],
            [torch.tensor(3), torch.tensor(0)], [torch.randn_like(t) for t in two],
            [torch.rand_like(t) for t in two], [12, 7], [0.1, 0.0], [False, True])
    opcheck(ops.update_running_stats, args)


@pytest.mark.parametrize("name", list(CASES))
def test_gradcheck(backend, name):
    args = CASES[name](torch.float64, torch.channels_last)
    diff_idx = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad]

    def first_output(*diff):
        full = list(args)
        for i, t in zip(diff_idx, diff):
            full[i] = t
        return as_tuple(getattr(ops, name)(*full))[0]

    inputs = tuple(args[i].detach().clone().requires_grad_() for i in diff_idx)
    assert torch.autograd.gradcheck(first_output, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


# --- running statistics ---------------------------------------------------------------------

@pytest.mark.parametrize("momentum", [0.1, 0.3, None])
def test_running_stats_match_batchnorm(backend, momentum):
    """Three training steps of nn.BatchNorm2d vs the fused op + update_running_stats."""
    bn = torch.nn.BatchNorm2d(6, momentum=momentum).double()
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
    rm, rv, nbt = bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()
    for _ in range(3):
        z = torch.randn(3, 6, 5, 4, dtype=torch.float64) * 2 + 1
        expected = F.relu(bn(z) + z)
        out, mean, var, _, _ = ops.bn_add_relu(z, bn.weight, bn.bias, rm, rv, z, None, None, None,
                                               None, None, True, bn.eps, bn.eps, True)
        ops.update_running_stats([rm], [rv], [nbt], [mean], [var], [z.numel() // 6],
                                 [momentum or 0.0], [momentum is None])
        assert rel_err(out, expected) < 1e-12
    assert rel_err(rm, bn.running_mean) < 1e-12
    assert rel_err(rv, bn.running_var) < 1e-12
    assert nbt.item() == bn.num_batches_tracked.item() == 3


# --- errors ------------------------------------------------------------------------------------

def test_errors_are_clear(backend):
    x = torch.randn(2, 3, 8, 8)
    w = torch.randn(4, 3, 3, 3)
    bn = bn_params(4)
    conv = ([1, 1], [1, 1], [1, 1], 1)
    with pytest.raises(ValueError, match="expected 4D input"):
        ops.conv_bn_relu(x[0], w, *bn, *conv, True, 1e-5, True)
    with pytest.raises(RuntimeError, match="should be the same"):
        ops.conv_bn_relu(x.double(), w, *bn, *conv, True, 1e-5, True)
    with pytest.raises(RuntimeError, match="expected input"):  # eager conv's channel message
        ops.conv_bn_relu(torch.randn(2, 5, 8, 8), w, *bn, *conv, True, 1e-5, True)
    with pytest.raises(RuntimeError, match="should contain 4 elements not 3"):
        ops.conv_bn_relu(x, w, *bn_params(3), *conv, True, 1e-5, True)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        ops.conv_bn_relu(x[:1, :, :1, :1], torch.randn(4, 3, 1, 1), *bn, [1, 1], [0, 0],
                         [1, 1], 1, True, 1e-5, True)
    z = torch.randn(2, 4, 5, 5)
    with pytest.raises(RuntimeError, match="shortcut must have the shape"):
        ops.bn_add_relu(z, *bn, torch.randn(2, 4, 5, 4), None, None, None, None, None, True,
                        1e-5, 1e-5, True)
    with pytest.raises(ValueError, match="not both"):
        ops.bn_add_relu(z, *bn, z, z, *bn, True, 1e-5, 1e-5, True)
    with pytest.raises(RuntimeError, match="floating-point"):
        ops.bn_add_relu(z.long(), *bn, None, None, None, None, None, None, True, 1e-5, 1e-5,
                        True)


def test_backend_selection_errors():
    with pytest.raises(ValueError, match="unknown fused_resnet backend"):
        fused_resnet.set_backend("fastest")
    x = torch.randn(2, 3, 8, 8)
    w = torch.randn(4, 3, 3, 3)
    with fused_resnet.use_backend("cuda"):
        with pytest.raises(fused_resnet.BackendUnavailableError, match="'cuda'"):
            ops.conv_bias_act(x, w, None, None, [1, 1], [1, 1], [1, 1], 1, True)
    assert fused_resnet.get_backend() in ("auto",) + tuple(CPU_BACKENDS)
    assert "reference" in fused_resnet.available_backends()


def test_auto_picks_compiled_cpu_backend_when_built():
    from fused_resnet import backends
    expected = "cpu" if "cpu" in fused_resnet.available_backends() else "reference"
    assert backends.resolve(torch.device("cpu"), "auto").name == expected


def test_nan_propagates_like_eager(backend):
    z = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    z[0, 1, 2, 2] = float("nan")
    gamma, beta, rm, rv = bn_params(3, torch.float64)
    z1, z2 = z.clone().requires_grad_(), z.clone().requires_grad_()
    out = ops.bn_add_relu(z1, gamma, beta, rm, rv, None, None, None, None, None, None, True,
                          1e-5, 1e-5, True)[0]
    ref = reference.bn_add_relu(z2, gamma, beta, rm, rv, None, None, None, None, None, None,
                                True, 1e-5, 1e-5, True)[0]
    assert torch.equal(out.isnan(), ref.isnan()) and out.isnan().any()
    out.sum().backward()
    ref.sum().backward()
    assert torch.equal(z1.grad.isnan(), z2.grad.isnan())


@pytest.mark.parametrize("name", list(CASES))
def test_double_backward_is_refused(backend, name):
    """create_graph=True gives the same first-order gradients; differentiating them
    again raises a clear error instead of silently dropping the second-order terms."""
    args = clone_args(CASES[name](torch.float64, torch.channels_last))
    inputs = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    out = as_tuple(getattr(ops, name)(*args))[0]
    weight = torch.randn(out.shape, dtype=torch.float64)
    plain = torch.autograd.grad((out * weight).sum(), inputs, retain_graph=True)
    graphed = torch.autograd.grad((out * weight).sum(), inputs, create_graph=True)
    for a, b in zip(graphed, plain):
        assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match="differentiable once"):
        sum(g.square().sum() for g in graphed).backward()
