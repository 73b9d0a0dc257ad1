"""Synchronised batch norm for data-parallel training (DDP), on CPU (gloo) and GPU (NCCL).

    model = fused_resnet.resnet50()
    model = fused_resnet.convert_sync_batchnorm(model)          # or (model, process_group)
    model = torch.nn.parallel.DistributedDataParallel(model)

`convert_sync_batchnorm` turns every nn.BatchNorm2d into a `SyncBatchNorm2d` (a subclass
with the same parameters, buffers and state_dict keys) that names a process group by a
string key. The fused operators take that key as their trailing `sync_group` argument
("" = no sync) and then, per BN layer (a block's BN + its projection-shortcut BN count
as one layer, their vectors travel together):

  forward   one all-reduce of [n*mean, n*(var + mean^2), n] per channel (float64: the
            merge of the ranks' statistics is exact to double rounding, as good as
            Chan's parallel-variance merge, and costs (2C+1)*8 bytes), giving the
            global mean, biased variance and count. Ranks may have different batch sizes.
  backward  one all-reduce of [sum_g, sum_g*(x-mean) (, the projection's)] in the
            accumulation dtype. The input gradient uses the global sums and count; the
            gamma/beta gradients use this rank's sums, so that DDP's averaging of
            parameter gradients gives the single-process gradient, as for every weight.

With sync on and batch statistics in use, the op's `var` output has C+1 elements: the
biased variance and then the global count, which the backward (the 1/n of the BN
gradient) and `ops.update_running_stats` (the n/(n-1) of the running variance) read.
That keeps one collective per layer and the GPU asynchronous (no count .item()).

Without an initialised process group, or with a group of one rank, nothing is
exchanged and the numbers are those of plain batch norm. Collectives run inside the
custom ops, opaque to torch.compile.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["SyncBatchNorm2d", "convert_sync_batchnorm", "revert_sync_batchnorm",
           "register_process_group", "get_process_group", "WORLD"]

WORLD = "world"   # the key of the default process group

# key -> ProcessGroup (None: the default group, resolved when used)
_GROUPS: dict = {WORLD: None}


def register_process_group(group=None, key: Optional[str] = None) -> str:
    """The key under which the fused operators find `group` (None: the default group)."""
    if group is None or group is getattr(dist.group, "WORLD", object()):
        if key is not None and key != WORLD:
            _GROUPS[str(key)] = None
            return str(key)
        return WORLD
    for k, g in _GROUPS.items():
        if g is group and (key is None or k == str(key)):
            return k
    if key is None:
        n = len(_GROUPS)
        while f"group{n}" in _GROUPS:
            n += 1
        key = f"group{n}"
    key = str(key)
    if not key:
        raise ValueError("a process-group key must be a non-empty string ('' means no sync)")
    _GROUPS[key] = group
    return key


def get_process_group(key: str):
    """The ProcessGroup registered under `key` (None for the default group)."""
    try:
        return _GROUPS[str(key)]
    except KeyError:
        raise KeyError(f"no process group is registered under the sync key {key!r}: "
                       f"use fused_resnet.convert_sync_batchnorm or "
                       f"fused_resnet.distributed.register_process_group "
                       f"(known: {sorted(_GROUPS)})") from None


def _active_group(key: str):
    """(group, True) when there are other ranks to talk to, else (None, False)."""
    group = get_process_group(key)
    if not (dist.is_available() and dist.is_initialized()):
        return None, False
    return group, dist.get_world_size(group) > 1


def _all_reduce(tensor: Tensor, group) -> None:
    """The one collective of sync BN (a function of its own so tests can count calls)."""
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)


# --- what the backends call ------------------------------------------------------------------

def sync_stats(key: str, z: Tensor, stats: Sequence[tuple]) -> tuple:
    """Merge per-rank batch statistics: `stats` is [(mean, var), ...] of tensors of z's
    shape (the BN of a block and of its projection shortcut go together); returns
    (mean, var_and_count, ...) with var_and_count = [biased var (C), global count (1)]."""
    count = z.numel() // z.shape[1]
    mean0 = stats[0][0]
    acc, device = mean0.dtype, mean0.device
    group, active = _active_group(key)
    if not active:   # one rank: the local statistics, exactly, and the local count
        n = torch.full((1,), float(count), dtype=acc, device=device)
        out = []
        for mean, var in stats:
            out += [mean, torch.cat([var, n])]
        return tuple(out)
    c = mean0.numel()
    n = float(count)
    parts = []
    for mean, var in stats:
        m, v = mean.double(), var.double()
        if count == 0:   # an empty shard contributes nothing (its local stats are NaN)
            m, v = torch.zeros_like(m), torch.zeros_like(v)
        parts += [m * n, (v + m * m) * n]
    parts.append(torch.full((1,), n, dtype=torch.float64, device=device))
    packed = torch.cat(parts)
    _all_reduce(packed, group)
    total = packed[-1:]
    out = []
    for i in range(len(stats)):
        mean = packed[2 * i * c:(2 * i + 1) * c] / total
        var = (packed[(2 * i + 1) * c:(2 * i + 2) * c] / total - mean * mean).clamp_min(0)
        out += [mean.to(acc), torch.cat([var, total]).to(acc)]
    return tuple(out)


def sync_sums(key: str, sums: Sequence[Tensor]) -> tuple:
    """Sum the backward's per-channel reductions over the group, in one all-reduce."""
    group, active = _active_group(key)
    if not active:
        return tuple(sums)
    sizes = [s.numel() for s in sums]
    packed = torch.cat([s.reshape(-1) for s in sums])
    _all_reduce(packed, group)
    return tuple(packed.split(sizes))


# --- modules ----------------------------------------------------------------------------------

class SyncBatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d whose training-mode statistics are those of the whole process
    group. Same parameters, buffers and state_dict as nn.BatchNorm2d. Inside fused
    blocks the fused operators do the work (fusion unchanged); on its own (e.g. in a
    torchvision model, or a custom downsample) it runs the fused BN operator without ReLU."""

    sync_group: str = WORLD

    # models.py fuses this class as it fuses nn.BatchNorm2d
    _fused_resnet_sync_bn = True

    def forward(self, x: Tensor) -> Tensor:
        from . import models, ops
        self._check_input_dim(x)
        out, mean, var, _, _ = ops.bn_add_relu(
            x, *models._bn_tensors(self), None, None, None, None, None, None,
            self.training, self.eps, self.eps, False, self.sync_group)
        models._update_running_stats(self, mean, var, x)
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, sync_group={self.sync_group!r}"


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Synchronise the batch norms of `module` over `process_group` (default: the whole
    world) for data-parallel training, like torch.nn.SyncBatchNorm.convert_sync_batchnorm
    but on CPU (gloo) as well as GPU (NCCL), and keeping the fused operators.

    Every nn.BatchNorm2d (or torch.nn.SyncBatchNorm) becomes a SyncBatchNorm2d in place
    (its class is swapped: same tensors, same state_dict); returns `module`. Works on
    fused models and on torchvision models (there the BN layers run the fused BN
    operator on their own; `fused_resnet.convert` first to fuse the blocks too)."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"convert_sync_batchnorm expects an nn.Module, got {type(module).__name__}")
    key = register_process_group(process_group)
    found = False
    for m in module.modules():
        if type(m) in (nn.BatchNorm2d, nn.SyncBatchNorm, SyncBatchNorm2d):
            if type(m) is nn.SyncBatchNorm:
                m.__dict__.pop("process_group", None)
            m.__class__ = SyncBatchNorm2d
            m.sync_group = key
            found = True
    if not found:
        import warnings
        warnings.warn("convert_sync_batchnorm found no nn.BatchNorm2d in the model",
                      stacklevel=2)
    return module


def revert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """The inverse of convert_sync_batchnorm: plain nn.BatchNorm2d again (in place)."""
    for m in module.modules():
        if type(m) is SyncBatchNorm2d:
            m.__dict__.pop("sync_group", None)
            m.__class__ = nn.BatchNorm2d
    return module


# --- launching ----------------------------------------------------------------------------------

def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_from_env(device_type: Optional[str] = None) -> tuple:
    """Initialise the default process group from torchrun's environment (RANK,
    WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT): gloo on CPU, NCCL on CUDA.
    Returns (rank, world_size, local_rank, device)."""
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank,
                                world_size=world, **kwargs)
    return rank, world, local_rank, device
