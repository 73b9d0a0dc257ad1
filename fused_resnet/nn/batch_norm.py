"""Batch norm as the fused modules see it: the tensors eager batch norm would use, the
running-statistics update after a fused op, plain BN through the fused BN operator,
and synchronised batch norm for data-parallel training (DDP), on CPU (gloo) and GPU
(NCCL).

    model = fused_resnet.resnet50()
    model = fused_resnet.convert_sync_batchnorm(model)          # or (model, process_group)
    model = torch.nn.parallel.DistributedDataParallel(model)

`convert_sync_batchnorm` turns every nn.BatchNorm2d into a `SyncBatchNorm2d` (a subclass
with the same parameters, buffers and state_dict keys) that names a process group by a
string key; the fused operators take that key as their trailing `sync_group` argument
and merge statistics and gradient sums over the group
(fused_resnet/backends/collectives.py).
"""
from __future__ import annotations

import warnings
from typing import NamedTuple, Optional

from torch import Tensor, nn

from .. import ops
from ..backends.collectives import WORLD, register_process_group


def bn_tensors(bn: nn.BatchNorm2d) -> tuple:
    """gamma, beta and the running buffers that eager batch norm would use."""
    tracked = not bn.training or bn.track_running_stats
    return (bn.weight, bn.bias, bn.running_mean if tracked else None,
            bn.running_var if tracked else None)


class StatsUpdate(NamedTuple):
    """A running-statistics update to do: bn's batch statistics of z, from a fused op."""
    bn: nn.BatchNorm2d
    mean: Tensor
    var: Tensor
    z: Tensor


def update_running_stats(*updates: StatsUpdate) -> None:
    """What training-mode BN does to its buffers, for every update at once (one operator
    call: a block passes all its batch norms)."""
    todo = [u for u in updates if u.bn.training and u.bn.track_running_stats]
    if not todo:
        return
    ops.update_running_stats(
        [u.bn.running_mean for u in todo], [u.bn.running_var for u in todo],
        [u.bn.num_batches_tracked for u in todo], [u.mean for u in todo],
        [u.var for u in todo],
        [u.z.numel() // u.z.shape[1] if u.z.shape[1] else 0 for u in todo],
        [0.0 if u.bn.momentum is None else float(u.bn.momentum) for u in todo],
        [u.bn.momentum is None for u in todo])


def batch_norm(z: Tensor, bn: nn.BatchNorm2d, shortcut: Optional[Tensor] = None,
               relu: bool = False, pending: tuple = ()) -> Tensor:
    """relu?(bn(z) (+ shortcut)) through the fused BN operator, then bn's running-statistics
    update, with the `pending` updates of the block in the same call: plain batch norm
    when there is neither shortcut nor ReLU."""
    out, mean, var, _, _ = ops.bn_add_relu(
        z, *bn_tensors(bn), shortcut, None, None, None, None, None, bn.training, bn.eps,
        bn.eps, relu, sync_key(bn))
    update_running_stats(*pending, StatsUpdate(bn, mean, var, z))
    return out


class SyncBatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d whose training-mode statistics are those of the whole process
    group. Same parameters, buffers and state_dict as nn.BatchNorm2d. Inside fused
    blocks the fused operators do the work (fusion unchanged); on its own (e.g. in a
    torchvision model, or a custom downsample) it runs the fused BN operator without ReLU."""

    sync_group: str = WORLD

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        return batch_norm(x, self)

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
        warnings.warn("convert_sync_batchnorm found no nn.BatchNorm2d in the model",
                      stacklevel=2)
    return module


def sync_key(bn: nn.BatchNorm2d) -> str:
    """The process-group key of a SyncBatchNorm2d, passed to the fused ops; "" for a
    plain nn.BatchNorm2d."""
    return bn.sync_group if isinstance(bn, SyncBatchNorm2d) else ""


def is_fusable_bn(m: nn.Module) -> bool:
    """nn.BatchNorm2d, or sync BN's subclass of it (same forward math, same state_dict)."""
    return type(m) in (nn.BatchNorm2d, SyncBatchNorm2d)


def revert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """The inverse of convert_sync_batchnorm: plain nn.BatchNorm2d again (in place)."""
    for m in module.modules():
        if type(m) is SyncBatchNorm2d:
            m.__dict__.pop("sync_group", None)
            m.__class__ = nn.BatchNorm2d
    return module


__all__ = ["bn_tensors", "sync_key", "is_fusable_bn", "StatsUpdate", "update_running_stats",
           "batch_norm", "SyncBatchNorm2d", "convert_sync_batchnorm", "revert_sync_batchnorm"]

