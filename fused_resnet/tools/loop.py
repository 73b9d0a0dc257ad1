"""The training loop's parts that train.py and degradation.py share: a model with its SGD
optimizer, learning-rate schedule, gradient scaler and curves (TrainingRun), its step, and
the evaluation of a model on a stream of batches. Data-parallel aware: with world > 1
the statistics are all-reduced over the ranks (the models then are DDP modules)."""
from __future__ import annotations

import time
from typing import Callable, Iterable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside torch.compile's and DDP's wrappers."""
    model = getattr(model, "_orig_mod", model)        # torch.compile
    return getattr(model, "module", model)           # DDP


def all_reduce(t: torch.Tensor, world: int) -> torch.Tensor:
    """The sum over the ranks, in place (nothing to do in one process)."""
    if world > 1:
        dist.all_reduce(t)
    return t


def logits(out: torch.Tensor) -> torch.Tensor:
    """The loss in fp32 at least (AMP's fp16/bf16 logits), fp64 stays fp64."""
    return out.float() if out.dtype in (torch.float16, torch.bfloat16) else out


def autocast(device_type: str, amp_dtype: Optional[torch.dtype]):
    """Autocast to `amp_dtype`, or explicitly off when it is None."""
    if amp_dtype is None:
        return torch.autocast(device_type, enabled=False)
    return torch.autocast(device_type, dtype=amp_dtype)


class TrainingRun:
    """One model being trained: module (maybe DDP/compiled), SGD optimizer, a LambdaLR
    schedule (lr x lr_factor(step)), a gradient scaler (enabled for fp16 autocast), and its
    curves in `history` (per step: loss, train_acc, lr; eval; train time, images)."""

    def __init__(self, label: str, model: nn.Module, lr: float, momentum: float,
                 weight_decay: float, lr_factor: Callable[[int], float], device_type: str,
                 amp_dtype: Optional[torch.dtype] = None):
        self.label = label
        self.model = model
        self.lr, self.lr_factor = lr, lr_factor
        self.device_type, self.amp_dtype = device_type, amp_dtype
        self.opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum,
                                   weight_decay=weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_factor)
        self.scaler = torch.amp.GradScaler(device_type, enabled=amp_dtype == torch.float16)
        self.history = {"step": [], "loss": [], "train_acc": [], "lr": [],
                        "eval": {"step": [], "loss": [], "acc": []}, "train_time_s": 0.0,
                        "images": 0}
        self.pending: list = []       # per-step (step, [loss_sum, correct]) not yet fetched

    def step(self, step: int, x: torch.Tensor, y: torch.Tensor, batch: int,
             world: int = 1) -> None:
        """One SGD step on this rank's share (x, y) of global step `step`'s batch of
        `batch` images; its loss and accuracy wait in `pending` until `flush`."""
        sync = torch.cuda.synchronize if self.device_type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        with autocast(self.device_type, self.amp_dtype):
            out = self.model(x)
        out = logits(out)
        loss_sum = F.cross_entropy(out, y, reduction="sum")
        # DDP averages the ranks' gradients: this scaling makes the average the
        # gradient of the global batch's mean loss (ranks may hold different counts)
        loss = loss_sum * (world / batch)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()
        sync()
        self.history["train_time_s"] += time.perf_counter() - t0
        self.history["images"] += batch
        correct = (out.detach().argmax(1) == y).sum()
        self.pending.append((step, torch.stack([loss_sum.detach().double(), correct.double()])))

    def flush(self, batch: int, world: int = 1) -> None:
        """Fetch the pending steps' statistics (summed over the ranks) into `history`."""
        if not self.pending:
            return
        stats = torch.stack([s for _, s in self.pending])
        all_reduce(stats, world)
        for (step, _), (loss_sum, correct) in zip(self.pending, stats.tolist()):
            self.history["step"].append(step)
            self.history["loss"].append(loss_sum / batch)
            self.history["train_acc"].append(correct / batch)
            self.history["lr"].append(self.lr * self.lr_factor(step))
        self.pending.clear()

    def state(self) -> dict:
        return {"state_dict": unwrap(self.model).state_dict(), "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(), "scaler": self.scaler.state_dict(),
                "history": self.history}

    def load(self, state: dict) -> None:
        unwrap(self.model).load_state_dict(state["state_dict"], strict=True)
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.history = state["history"]


def evaluate(model: nn.Module, batches: Iterable, device: torch.device,
             amp_dtype: Optional[torch.dtype] = None, world: int = 1) -> tuple:
    """(summed loss, correct predictions, images) of `model` in eval mode over `batches`
    of (x, y), summed over the ranks. The bare module runs (eval-mode BN folds: no
    collective inside); its train/eval mode is restored afterwards."""
    module = unwrap(model)
    was_training = module.training
    module.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    with torch.no_grad(), autocast(device.type, amp_dtype):
        for x, y in batches:
            out = logits(module(x))
            totals[0] += F.cross_entropy(out, y, reduction="sum").double()
            totals[1] += (out.argmax(1) == y).sum()
            totals[2] += y.numel()
    module.train(was_training)
    all_reduce(totals, world)
    loss, correct, n = totals.tolist()
    return loss, correct, n
