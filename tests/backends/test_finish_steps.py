"""The compiled per-channel finish steps (csrc/bn_finish.h; CPU csrc/cpu/bn_finish.cpp,
CUDA csrc/cuda/bn_finish.cu) against their PyTorch oracle (fused_resnet.backends.primitives)
and eager batch norm, on fresh random inputs: bn_scale_shift, bn_stats_affine,
bn_backward_coefficients and bn_update_running_stats; plus opcheck and CUDA-graph capture.

Tolerances: per-channel results in float32 against the oracle's float64 are a few
roundings apart (1e-6 relative); float64 1e-12."""
import pytest
import torch
from torch import nn

import fused_resnet  # noqa: F401  (loads fused_resnet._C)
from fused_resnet.backends import has_compiled_kernel
from fused_resnet.backends import primitives as P

DEVICES = [pytest.param("cpu", marks=pytest.mark.skipif(
               not has_compiled_kernel("bn_stats_affine", "cpu"),
               reason="fused_resnet._C has no CPU finish-step kernels")),
           pytest.param("cuda", marks=pytest.mark.skipif(
               not (torch.cuda.is_available() and has_compiled_kernel("bn_stats_affine", "cuda")),
               reason="needs a GPU and the CUDA kernels"))]
TOL = {torch.float32: 1e-6, torch.float64: 1e-12}
ops = torch.ops.fused_resnet


def rel(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def vec(c, dtype, device, positive=False):
    v = torch.randn(c, dtype=dtype, device=device)
    return v.abs() + 0.1 if positive else v


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("acc", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_bn_scale_shift(device, acc, affine):
    c = 37
    mean, var = vec(c, acc, device), vec(c, acc, device, positive=True)
    gamma = vec(c, torch.float32, device) if affine else None
    beta = vec(c, torch.float32, device) if affine else None
    got = ops.bn_scale_shift(mean, var, gamma, beta, 1e-5)
    want = P.bn_scale_shift(mean.double(), var.double(),
                            None if gamma is None else gamma.double(),
                            None if beta is None else beta.double(), 1e-5)
    for g, w in zip(got, want):
        assert g.dtype == acc and g.shape == (c,)
        assert rel(g, w) < TOL[acc]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp64", "fp32", "bf16", "fp16"])
def test_bn_stats_affine(device, dtype):
    x = (torch.randn(3, 19, 5, 7, device=device) * 2 + 0.5).to(dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    gamma, beta = vec(19, torch.float32, device), vec(19, torch.float32, device)
    got = ops.bn_stats_affine(x, gamma, beta, 1e-3)
    want = P.bn_stats_affine(x.double(), gamma.double(), beta.double(), 1e-3)
    acc = P.acc_dtype(dtype)
    for g, w in zip(got, want):
        assert g.dtype == acc
        assert rel(g, w) < TOL[acc] * 10


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16],
                         ids=["fp64", "fp32", "bf16"])
@pytest.mark.parametrize("with_out, with_x2, batch_stats",
                         [(True, False, True), (False, False, True), (True, True, True),
                          (True, False, False), (True, True, False)])
def test_bn_backward_coefficients(device, dtype, with_out, with_x2, batch_stats):
    shape = (4, 13, 6, 5)
    mk = lambda: torch.randn(shape, device=device).to(dtype)  # noqa: E731
    grad_out, x = mk(), mk()
    out = mk().clamp_min(0) if with_out else None
    acc = P.acc_dtype(dtype)
    mean, var = vec(13, acc, device), vec(13, acc, device, positive=True)
    gamma = vec(13, torch.float32, device)
    x2 = mk() if with_x2 else None
    mean2 = vec(13, acc, device) if with_x2 else None
    var2 = vec(13, acc, device, positive=True) if with_x2 else None
    gamma2 = vec(13, torch.float32, device) if with_x2 else None
    args = (grad_out, out, x, mean, var, gamma, 1e-5, batch_stats, x2, mean2, var2, gamma2, 1e-4)
    got = ops.bn_backward_coefficients(*args)
    d = lambda t: None if t is None else t.double()  # noqa: E731
    want = P.bn_backward_coefficients(*[d(a) if isinstance(a, torch.Tensor) else a
                                        for a in args])
    assert got[0].shape == (5, 13) and got[0].dtype == acc
    assert rel(got[0], want[0]) < TOL[acc] * 10
    assert got[1].numel() == (65 if with_x2 else 0)
    if with_x2:
        assert rel(got[1], want[1]) < TOL[acc] * 10


def _bn_layers(device, momentum, dtype=torch.float32):
    torch.manual_seed(0)
    layers = [nn.BatchNorm2d(c, momentum=momentum).to(device, dtype) for c in (5, 8, 3)]
    for bn in layers:
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
    return layers


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_bn_update_running_stats_matches_eager(device, momentum):
    """Three steps of three layers at once, as eager training-mode BN leaves its buffers."""
    ours, eager = _bn_layers(device, momentum), _bn_layers(device, momentum)
    for step in range(3):
        xs = [torch.randn(4, bn.num_features, 3, 5, device=device) + step for bn in ours]
        for bn, x in zip(eager, xs):
            bn.train()(x)
        stats = [P.bn_stats(x) for x in xs]
        ops.bn_update_running_stats(
            [bn.running_mean for bn in ours], [bn.running_var for bn in ours],
            [bn.num_batches_tracked for bn in ours], [s[0] for s in stats],
            [s[1] for s in stats], [x.numel() // x.shape[1] for x in xs],
            [0.0 if momentum is None else momentum] * 3, [momentum is None] * 3)
    for a, b in zip(ours, eager):
        assert torch.equal(a.num_batches_tracked, b.num_batches_tracked)
        assert rel(a.running_mean, b.running_mean) < 1e-6
        assert rel(a.running_var, b.running_var) < 1e-6


@pytest.mark.parametrize("device", DEVICES)
def test_bn_update_running_stats_sync_count_empty_batch_and_bf16(device):
    """Sync BN's var carries the global count (C + 1 elements); an empty batch is only
    counted; bfloat16 running buffers are updated in float and rounded once."""
    c, n = 6, 40
    mean, var = vec(c, torch.float32, device), vec(c, torch.float32, device, positive=True)
    rm, rv = vec(c, torch.float32, device), vec(c, torch.float32, device, positive=True)
    nbt = torch.zeros((), dtype=torch.long, device=device)
    ref = [t.clone() for t in (rm, rv, nbt)]
    synced = torch.cat([var, torch.tensor([float(n)], device=device)])
    ops.bn_update_running_stats([rm], [rv], [nbt], [mean], [synced], [7], [0.1], [False])
    P.bn_update_running_stats(*ref, mean, var, n, 0.1, False)
    assert rel(rm, ref[0]) < 1e-6 and rel(rv, ref[1]) < 1e-6 and nbt.item() == 1
    before = (rm.clone(), rv.clone())
    ops.bn_update_running_stats([rm], [rv], [nbt], [mean], [var], [0], [0.1], [False])
    assert torch.equal(rm, before[0]) and torch.equal(rv, before[1]) and nbt.item() == 2
    rm16, rv16 = rm.bfloat16(), rv.bfloat16()
    exp_m = rm16.float() * 0.5 + mean * 0.5
    ops.bn_update_running_stats([rm16], [rv16], [nbt], [mean], [var], [n], [0.5], [False])
    assert rm16.dtype == torch.bfloat16
    assert rel(rm16, exp_m) < 2 ** -8


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    c = 11
    x = torch.randn(2, c, 4, 3, device=device)
    g, b = vec(c, torch.float32, device), vec(c, torch.float32, device)
    mean, var = P.bn_stats(x)
    torch.library.opcheck(ops.bn_scale_shift.default, (mean, var, g, b, 1e-5))
    torch.library.opcheck(ops.bn_stats_affine.default, (x, g, b, 1e-5))
    torch.library.opcheck(ops.bn_backward_coefficients.default,
                          (torch.randn_like(x), x.clamp_min(0), x, mean, var, g, 1e-5, True,
                           torch.randn_like(x), mean, var, b, 1e-5))
    layers = _bn_layers(device, 0.1)
    torch.library.opcheck(ops.bn_update_running_stats.default,
                          ([bn.running_mean for bn in layers[:1]],
                           [bn.running_var for bn in layers[:1]],
                           [bn.num_batches_tracked for bn in layers[:1]], [mean[:5]], [var[:5]],
                           [8], [0.1], [False]))


@pytest.mark.parametrize("device", DEVICES)
def test_errors(device):
    x = torch.randn(2, 4, 3, 3, device=device)
    mean, var = P.bn_stats(x)
    with pytest.raises(RuntimeError, match="per-channel"):
        ops.bn_scale_shift(mean, var[:3], None, None, 1e-5)
    with pytest.raises(RuntimeError, match="gamma"):
        ops.bn_stats_affine(x, torch.ones(5, device=device), None, 1e-5)
    with pytest.raises(RuntimeError, match="var2 is required"):
        ops.bn_backward_coefficients(x, None, x, mean, var, None, 1e-5, True, x, mean, None,
                                     None, 1e-5)
    bn = _bn_layers(device, 0.1)[0]
    with pytest.raises(RuntimeError, match="one entry per layer"):
        ops.bn_update_running_stats([bn.running_mean], [bn.running_var], [], [mean], [var],
                                    [9], [0.1], [False])


@pytest.mark.parametrize("device", DEVICES[1:])
def test_cuda_graph_capture_of_the_update(device):
    """The update reads num_batches_tracked (cumulative average) on the device: a captured
    update replayed 3 times equals 3 eager updates."""
    ours, eager = _bn_layers(device, None), _bn_layers(device, None)
    x = torch.randn(4, 5, 3, 3, device=device)
    mean, var = P.bn_stats(x)
    args = lambda layers: ([layers[0].running_mean], [layers[0].running_var],  # noqa: E731
                           [layers[0].num_batches_tracked], [mean], [var], [36], [0.0], [True])
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        ops.bn_update_running_stats(*args(ours))       # warm-up, counted
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.bn_update_running_stats(*args(ours))
    for _ in range(3):
        graph.replay()
    for _ in range(4):
        P.bn_update_running_stats(eager[0].running_mean, eager[0].running_var,
                                  eager[0].num_batches_tracked, mean, var, 36, 0.0, True)
    torch.cuda.synchronize()
    assert ours[0].num_batches_tracked.item() == 4
    assert rel(ours[0].running_mean, eager[0].running_mean) < 1e-6
    assert rel(ours[0].running_var, eager[0].running_var) < 1e-6
