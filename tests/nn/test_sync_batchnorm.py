"""Sync BN and data-parallel training: N gloo ranks on CPU (loopback only), in float64,
each with a shard of the batch (uneven shard sizes, one rank with a single image so that
the deep layers have one value per channel locally), against one process on the whole
batch: outputs, every gradient (after DDP's averaging), running statistics, three SGD
steps with momentum and weight decay, and the eval-mode outputs afterwards; plus the
number of collectives (one per BN layer forward, one backward: a block's BN and its
projection shortcut's share theirs), and the single-process behaviour of the sync path.
"""
import copy
import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet as tv

import fused_resnet
from fused_resnet.backends import collectives as fdist
from fused_resnet import ops

# float64 throughout: the sharded and the whole-batch computations differ only by the
# order of the reductions (and the float64 merge of the shards' statistics), so they
# agree to ~1e-15; 1e-10 leaves room for the depth of the network and three steps.
TOL = 1e-10
STEPS = 3
HW = 16


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _randomise_bn(model: nn.Module, gen: torch.Generator) -> None:
    """BN far from the identity, and running statistics that are not the defaults."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            with torch.no_grad():
                m.weight.copy_(torch.rand(c, generator=gen, dtype=torch.float64) + 0.5)
                m.bias.copy_(torch.randn(c, generator=gen, dtype=torch.float64) * 0.2)
                m.running_mean.copy_(torch.randn(c, generator=gen, dtype=torch.float64))
                m.running_var.copy_(torch.rand(c, generator=gen, dtype=torch.float64) + 0.5)


def _model(kind: str) -> tuple:
    """(model, expected collectives per forward = per backward)."""
    torch.manual_seed(0)
    if kind == "basic":          # identity and projection shortcuts, fused blocks
        model, calls = fused_resnet.ResNet(tv.BasicBlock, [1, 1, 1, 1], num_classes=5), 1 + 4 * 2
    elif kind == "bottleneck":   # projection everywhere, three BN per block
        model = fused_resnet.ResNet(tv.Bottleneck, [1, 1, 1, 1], num_classes=5, width_per_group=16)
        calls = 1 + 4 * 3
    elif kind == "torchvision":  # torchvision's own blocks: SyncBatchNorm2d on its own
        model = tv.ResNet(tv.BasicBlock, [1, 1, 1, 1], num_classes=5)
        calls = 1 + 4 * 2 + 3
    else:
        raise ValueError(kind)
    model = model.double()
    _randomise_bn(model, torch.Generator().manual_seed(1))
    return model, calls


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    d = b.norm().item()
    return (a - b).norm().item() / d if d > 0 else (a - b).norm().item()


def _case(rank: int, world: int, sizes: list, kind: str, backend: str) -> dict:
    """Runs one model both ways on this rank; returns {name: relative error} and counts."""
    errs = {}
    total = sum(sizes)
    lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
    gen = torch.Generator().manual_seed(2)
    batches = [(torch.randn(total, 3, HW, HW, generator=gen, dtype=torch.float64),
                torch.randint(0, 5, (total,), generator=gen)) for _ in range(STEPS)]

    with fused_resnet.use_backend(backend):
        ref, calls = _model(kind)
        if kind == "torchvision":
            ref = fused_resnet.convert(ref)           # the single-process oracle: fused, no sync
        model = fused_resnet.convert_sync_batchnorm(copy.deepcopy(_model(kind)[0]))
        assert sum(isinstance(m, fused_resnet.SyncBatchNorm2d) for m in model.modules()) == \
            sum(isinstance(m, nn.BatchNorm2d) for m in ref.modules())
        ddp = nn.parallel.DistributedDataParallel(model)
        opt_kw = dict(lr=0.1, momentum=0.9, weight_decay=1e-4)
        opt, ref_opt = (torch.optim.SGD(m.parameters(), **opt_kw) for m in (ddp, ref))

        counter = {"n": 0}
        original = fdist.all_reduce

        def counting(tensor, group):
            counter["n"] += 1
            original(tensor, group)

        fdist.all_reduce = counting
        try:
            for step, (x, y) in enumerate(batches):
                counter["n"] = 0
                out = ddp(x[lo:hi])
                fwd_calls = counter["n"]
                # DDP averages the ranks' gradients: scale each rank's summed loss so that
                # the average is the gradient of the whole batch's mean loss
                loss = F.cross_entropy(out, y[lo:hi], reduction="sum") * world / total
                counter["n"] = 0
                loss.backward()
                bwd_calls = counter["n"]

                ref_out = ref(x)
                F.cross_entropy(ref_out, y).backward()
                if step == 0:
                    errs["calls_forward"] = (fwd_calls, calls)
                    errs["calls_backward"] = (bwd_calls, calls)
                    errs["out"] = _rel(out, ref_out[lo:hi])
                    params = dict(model.named_parameters())
                    for name, p in ref.named_parameters():
                        errs[f"grad {name}"] = _rel(params[name].grad, p.grad)
                    bufs = dict(model.named_buffers())
                    for name, b in ref.named_buffers():
                        errs[f"buffer {name}"] = _rel(bufs[name], b)
                opt.step(), ref_opt.step()
                opt.zero_grad(), ref_opt.zero_grad()
        finally:
            fdist.all_reduce = original

        params = dict(model.named_parameters())
        for name, p in ref.named_parameters():
            errs[f"step{STEPS} {name}"] = _rel(params[name], p)
        bufs = dict(model.named_buffers())
        for name, b in ref.named_buffers():
            errs[f"step{STEPS} buffer {name}"] = _rel(bufs[name], b)
        ddp.eval(), ref.eval()
        with torch.no_grad():
            x = batches[0][0]
            errs["eval out"] = _rel(ddp(x[lo:hi]), ref(x)[lo:hi])
    return errs


def _worker(rank: int, world: int, port: int, sizes: list, cases: list, out_dir: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"   # loopback only
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        results = {f"{kind}/{backend}": _case(rank, world, sizes, kind, backend)
                   for kind, backend in cases}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _cases() -> list:
    fast = "cpu" if "cpu" in fused_resnet.available_backends() else "reference"
    return [("basic", fast), ("bottleneck", "reference"), ("torchvision", fast)]


@pytest.mark.parametrize("sizes", [[3, 5], [2, 4, 1]], ids=["2ranks", "3ranks"])
def test_sync_bn_ddp_equals_single_process(sizes):
    world = len(sizes)
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(world, _free_port(), sizes, _cases(), out_dir), nprocs=world,
                 join=True)
        results = [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(world)]
    for rank, per_case in enumerate(results):
        for case, errs in per_case.items():
            got, want = errs.pop("calls_forward")
            assert got == want, f"rank {rank} {case}: {got} collectives in forward, want {want}"
            got, want = errs.pop("calls_backward")
            assert got == want, f"rank {rank} {case}: {got} collectives in backward, want {want}"
            bad = {k: v for k, v in errs.items() if not v < TOL}
            assert not bad, f"rank {rank} {case}: relative errors above {TOL}: {bad}"
            assert len(errs) > 20


# --- single process ------------------------------------------------------------------------

def test_sync_without_process_group_is_plain_batch_norm():
    """No process group: sync BN computes what BN computes (and trains the same)."""
    assert not dist.is_initialized()
    torch.manual_seed(0)
    ref = fused_resnet.ResNet(tv.BasicBlock, [1, 1, 1, 1], num_classes=5).double()
    _randomise_bn(ref, torch.Generator().manual_seed(1))
    model = fused_resnet.convert_sync_batchnorm(copy.deepcopy(ref))
    x = torch.randn(4, 3, HW, HW, dtype=torch.float64)
    out, ref_out = model(x), ref(x)
    out.square().sum().backward()
    ref_out.square().sum().backward()
    assert _rel(out, ref_out) < 1e-14
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert _rel(p.grad, q.grad) < 1e-13, name
    for (name, b), c in zip(model.named_buffers(), ref.buffers()):
        assert _rel(b, c) < 1e-14, name


def test_convert_sync_batchnorm_keeps_state_dict_and_reverts():
    model = fused_resnet.resnet18(num_classes=7)
    keys = {k: v.data_ptr() for k, v in model.state_dict().items()}
    fused_resnet.convert_sync_batchnorm(model)
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == keys
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 20 and all(type(m) is fused_resnet.SyncBatchNorm2d for m in bns)
    assert all(m.sync_group == fdist.WORLD for m in bns)
    tv_model = tv.resnet18(num_classes=7)
    tv_model.load_state_dict(model.state_dict(), strict=True)
    fused_resnet.revert_sync_batchnorm(model)
    assert all(type(m) is nn.BatchNorm2d for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    # torch's own SyncBatchNorm converts too
    sm = nn.SyncBatchNorm.convert_sync_batchnorm(tv.resnet18(num_classes=3))
    fused_resnet.convert_sync_batchnorm(sm)
    assert all(type(m) is fused_resnet.SyncBatchNorm2d
               for m in sm.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    with pytest.raises(KeyError, match="no process group"):
        fdist.get_process_group("nope")


def test_sync_ops_opcheck_and_count_output():
    """With sync_group set the var output carries the count (C+1 elements); fake kernels,
    autograd and the running-stat update agree (one process: the local count)."""
    torch.manual_seed(0)
    z = torch.randn(2, 6, 5, 4, dtype=torch.float64, requires_grad=True)
    gamma = (torch.rand(6, dtype=torch.float64) + 0.5).requires_grad_()
    beta = torch.randn(6, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.randn(6, dtype=torch.float64), torch.rand(6, dtype=torch.float64) + 0.5
    w = torch.randn(4, 6, 3, 3, dtype=torch.float64, requires_grad=True)
    args = (z, gamma, beta, rm, rv, w, [1, 1], [1, 1], [1, 1], 1, True, 1e-5, True)
    out, mean, var, _, _ = ops.bn_relu_conv(*args, fdist.WORLD)
    ref_out, ref_mean, ref_var, _, _ = ops.bn_relu_conv(*args)
    assert var.shape == (7,) and var[-1].item() == 2 * 5 * 4
    assert torch.equal(out, ref_out) and torch.equal(var[:6], ref_var)
    torch.library.opcheck(torch.ops.fused_resnet.bn_relu_conv.default, args + (fdist.WORLD,))
    # eval mode: running statistics, no count
    assert ops.bn_relu_conv(*args[:10], False, 1e-5, True, fdist.WORLD)[2].shape == (6,)
    r1, v1, r2, v2 = rm.clone(), rv.clone(), rm.clone(), rv.clone()
    counted = torch.tensor(0)
    ops.update_running_stats([r1], [v1], [counted], [mean], [var], [12345], [0.1],
                             [False])   # the count comes from var
    ops.update_running_stats([r2], [v2], [counted], [ref_mean], [ref_var], [40], [0.1], [False])
    assert torch.allclose(r1, r2, rtol=0, atol=1e-15) and torch.allclose(v1, v2, rtol=1e-15)


def test_sync_bn_under_torch_compile_fullgraph():
    """The sync_group argument and the (C+1)-element var trace through torch.compile
    (the collectives would run inside the opaque custom ops); no process group here."""
    torch.manual_seed(0)
    ref = fused_resnet.ResNet(tv.BasicBlock, [1, 1, 1, 1], num_classes=5)
    model = fused_resnet.convert_sync_batchnorm(copy.deepcopy(ref))
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = torch.randn(4, 3, HW, HW)
    out, ref_out = compiled(x), ref(x)
    out.sum().backward()
    ref_out.sum().backward()
    assert _rel(out, ref_out) < 1e-6
    assert _rel(model.conv1.weight.grad, ref.conv1.weight.grad) < 1e-5
    assert _rel(model.layer2[0].downsample[1].running_var,
                ref.layer2[0].downsample[1].running_var) < 1e-6
