"""The collectives of synchronised batch norm (data-parallel training, DDP), on CPU
(gloo) and GPU (NCCL): what a backend calls when a BN layer's `sync` key is set.

The fused operators take a process-group key as their trailing `sync_group` argument
("" = no sync; fused_resnet.nn.convert_sync_batchnorm sets it on the modules) and then,
per BN layer (a block's BN + its projection-shortcut BN count as one layer, their
vectors travel together):

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
gradient) and the running-statistics update (the n/(n-1) of the running variance)
read. That keeps one collective per layer and the GPU asynchronous (no count .item()).

Without an initialised process group, or with a group of one rank, nothing is
exchanged and the numbers are those of plain batch norm. Collectives run inside the
custom ops, opaque to torch.compile.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["register_process_group", "get_process_group", "sync_stats", "sync_sums",
           "all_reduce", "split_count", "WORLD"]

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
                       f"fused_resnet.backends.collectives.register_process_group "
                       f"(known: {sorted(_GROUPS)})") from None


def _active_group(key: str):
    """(group, True) when there are other ranks to talk to, else (None, False)."""
    group = get_process_group(key)
    if not (dist.is_available() and dist.is_initialized()):
        return None, False
    return group, dist.get_world_size(group) > 1


def all_reduce(tensor: Tensor, group) -> None:
    """The one collective of sync BN (a function of its own so tests can count calls)."""
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)


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
    all_reduce(packed, group)
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
    all_reduce(packed, group)
    return tuple(packed.split(sizes))


def split_count(var: Tensor, c: int) -> tuple:
    """(biased var [C], global count or None): with sync BN the op's var output has C+1
    elements, the last being the number of values per channel over all ranks."""
    if var.dim() == 1 and var.numel() == c + 1:
        return var[:c], var[c]
    return var, None
