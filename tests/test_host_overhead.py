"""What a training step costs the host, counted on the CPU: the operators it dispatches
(each one a kernel launch on a GPU; fused_resnet.testing.DispatchCounter) and host
synchronisations (aten::_local_scalar_dense: .item(), bool(tensor), .tolist()), which
also forbid CUDA-graph capture. A fused step must dispatch no more than eager
torchvision's and never synchronise."""
import copy

import pytest
import torch
import torchvision
from torch import nn

import fused_resnet
import fused_resnet.kernels as kernels
from fused_resnet.testing.dispatch import DispatchCounter

CL = torch.channels_last


def _train_step_counts(model: nn.Module, x: torch.Tensor) -> DispatchCounter:
    """The dispatches of one forward + backward + SGD step (after a first, uncounted step:
    lazily made state is not a per-step cost)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        opt.zero_grad(set_to_none=True)
        model(x).sum().backward()
        opt.step()

    step()
    with DispatchCounter() as counter:
        step()
    return counter


def _resnet50_pair():
    torch.manual_seed(0)
    tv = torchvision.models.resnet50(num_classes=10).to(memory_format=CL).train()
    fused = fused_resnet.resnet50(num_classes=10).to(memory_format=CL).train()
    fused.load_state_dict(tv.state_dict())
    return tv, fused


@pytest.mark.skipif("cpu" not in fused_resnet.available_backends(),
                    reason="needs the compiled cpu backend (fused_resnet._C)")
def test_resnet50_step_dispatches_no_more_than_eager_and_never_syncs():
    tv, fused = _resnet50_pair()
    x = torch.randn(2, 3, 32, 32).to(memory_format=CL)
    eager = _train_step_counts(tv, x)
    with fused_resnet.use_backend("cpu"):
        ours = _train_step_counts(fused, x)
    with fused_resnet.use_backend("reference"):
        oracle = _train_step_counts(copy.deepcopy(fused), x)
    print(f"\nResNet-50 train step, dispatched ops: eager {eager.launches}, cpu backend "
          f"{ours.launches} ({ours.launches / eager.launches:.2f}x), reference backend "
          f"{oracle.launches} ({oracle.launches / eager.launches:.2f}x)\n"
          f"cpu backend, most dispatched: {ours.by_op.most_common(8)}")
    assert ours.syncs == 0 and oracle.syncs == 0, (ours.by_op, oracle.by_op)
    assert ours.launches <= eager.launches, ours.by_op.most_common(12)
    # the test can fail: the composite finish steps (the reference backend) dispatch more
    assert oracle.launches > eager.launches


@pytest.mark.skipif("cpu" not in fused_resnet.available_backends(),
                    reason="needs the compiled cpu backend (fused_resnet._C)")
def test_eval_forward_dispatches_no_more_than_eager():
    tv, fused = _resnet50_pair()
    tv.eval()
    fused.eval()
    x = torch.randn(2, 3, 32, 32).to(memory_format=CL)
    with torch.no_grad(), DispatchCounter() as eager:
        tv(x)
    with torch.no_grad(), fused_resnet.use_backend("cpu"), DispatchCounter() as ours:
        fused(x)
    print(f"\nResNet-50 inference, dispatched ops: eager {eager.launches}, cpu backend "
          f"{ours.launches}")
    assert ours.syncs == 0
    assert ours.launches <= eager.launches, ours.by_op.most_common(12)


@pytest.mark.skipif("triton" not in fused_resnet.available_backends(),
                    reason="needs triton (on CPU: TRITON_INTERPRET=1, set by conftest.py)")
def test_triton_step_never_syncs(monkeypatch):
    """The Triton backend's training step, batch statistics from the conv epilogue
    included, reads nothing back to the host (on CPU: under the interpreter)."""
    torch.manual_seed(0)
    model = fused_resnet.cifar_resnet20(num_classes=5).to(memory_format=CL).train()
    x = torch.randn(2, 3, 8, 8).to(memory_format=CL)
    conv2d, calls = kernels.conv.conv2d, []
    monkeypatch.setattr(kernels.conv, "conv2d",
                        lambda *a, **k: calls.append(k.get("stats", False)) or conv2d(*a, **k))
    with fused_resnet.use_backend("triton"):
        counter = _train_step_counts(model, x)
    assert any(calls), "the stem's statistics did not come from the Triton conv epilogue"
    assert counter.launches > 0
    assert counter.syncs == 0, counter.by_op
