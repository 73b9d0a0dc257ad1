"""The whole-step CUDA-graph capture (fused_resnet/tools/cuda_graphs.py): a captured fused
training step gives the parameters and running statistics of the uncaptured one after
3 steps (GPU), and asks for CUDA tensors (CPU)."""
import copy

import pytest
import torch

import fused_resnet
from fused_resnet.tools.cuda_graphs import GraphedTrainStep
from conftest import rel_err

CUDA = torch.cuda.is_available()


def test_capture_needs_cuda():
    model = fused_resnet.resnet18(num_classes=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        GraphedTrainStep(model, opt, torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))


def _train(model, batches, captured, amp):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    if captured:
        step = GraphedTrainStep(model, opt, *batches[0], amp_dtype=amp, warmup=3)
        for x, y in batches[1:]:
            step(x, y)
        return model
    for x, y in [batches[0]] * 3 + batches[1:]:       # the 3 warm-up steps, then the rest
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=amp, enabled=amp is not None, cache_enabled=False):
            out = model(x)
        torch.nn.functional.cross_entropy(out.float(), y).backward()
        opt.step()
    return model


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("amp", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_captured_step_equals_uncaptured(backend, amp):
    if backend not in fused_resnet.available_backends():
        pytest.skip(f"{backend} backend unavailable")
    torch.manual_seed(0)
    base = fused_resnet.resnet50(num_classes=10).cuda().to(memory_format=torch.channels_last)
    g = torch.Generator(device="cuda").manual_seed(1)
    batches = [(torch.randn(8, 3, 64, 64, device="cuda", generator=g)
                .contiguous(memory_format=torch.channels_last),
                torch.randint(0, 10, (8,), device="cuda", generator=g)) for _ in range(4)]
    with fused_resnet.use_backend(backend):
        plain = _train(copy.deepcopy(base), batches, False, amp)
        again = _train(copy.deepcopy(base), batches, False, amp)   # run-to-run noise
        graphed = _train(copy.deepcopy(base), batches, True, amp)
    torch.cuda.synchronize()
    for name, a in graphed.state_dict().items():
        b, c = plain.state_dict()[name], again.state_dict()[name]
        if a.is_floating_point():   # no further from eager than eager from itself
            assert rel_err(a, b) <= 4 * rel_err(c, b) + 1e-6, name
        else:
            assert torch.equal(a, b), name
