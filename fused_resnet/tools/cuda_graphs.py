"""A whole training step - forward, loss, backward, optimizer step - captured in one CUDA
graph on static input buffers, as PyTorch's whole-network capture recipe does: warm-up
steps on a side stream (lazy initialisation, cuDNN's algorithm choice, the optimizer's
state), then one capture, then every step is a copy of the batch into the static inputs
and one replay. The step must not synchronise with the host (fused_resnet's steps do
not: tests/test_host_overhead.py)."""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn


class GraphedTrainStep:
    """step(x, y) -> loss: one replay of the captured training step of `model`.

    amp_dtype: the autocast dtype (None: off); autocast's weight cache is off, as capture
    requires. warmup: uncaptured steps first (they are real steps: they update the
    parameters, as every replay does)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
                 y: torch.Tensor, amp_dtype: Optional[torch.dtype] = None, warmup: int = 3,
                 loss_fn: Callable = F.cross_entropy):
        if x.device.type != "cuda":
            raise RuntimeError(f"CUDA-graph capture needs CUDA tensors, got a tensor on "
                               f"{x.device}")
        self.model, self.optimizer, self.loss_fn, self.amp_dtype = model, optimizer, loss_fn, \
            amp_dtype
        self.static_x, self.static_y = x.clone(), y.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                self.optimizer.zero_grad(set_to_none=True)
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.cuda.graph(self.graph):
            self.static_loss = self._step()

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self.amp_dtype, cache_enabled=False)

    def _step(self) -> torch.Tensor:
        with self._autocast():
            out = self.model(self.static_x)
        loss = self.loss_fn(out.float(), self.static_y)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.static_x.copy_(x, non_blocking=True)
        self.static_y.copy_(y, non_blocking=True)
        self.graph.replay()
        return self.static_loss
