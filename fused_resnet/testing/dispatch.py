"""Counting what a step dispatches: the ops that launch work (a kernel on a GPU), and the
host synchronisations (`aten::_local_scalar_dense`: .item(), bool(tensor), .tolist()).

    with DispatchCounter() as counter:
        train_step()
    counter.launches, counter.syncs, counter.by_op

Views and allocations are not counted (they launch nothing). Operators of this package
written in Python are looked into: the ops they dispatch are counted, not the operator
itself; the compiled primitives count as one launch each. Triton kernels launched from
Python are not dispatched ops and are not counted.
"""
from __future__ import annotations

import collections

from torch.utils._python_dispatch import TorchDispatchMode

from ..ops.registration import python_implementation

# ops that allocate or alias without launching anything
NOT_LAUNCHING = frozenset({
    "aten.empty", "aten.empty_like", "aten.empty_strided", "aten.new_empty",
    "aten.new_empty_strided", "aten.detach", "aten.lift_fresh", "aten.alias",
    "aten.set_", "aten.resize_", "aten.as_strided_", "aten.sym_size", "aten.sym_stride", "aten.sym_numel",
    "aten.sym_storage_offset", "aten.is_same_size", "profiler._record_function_enter_new",
    "profiler._record_function_exit"})
HOST_SYNC = "aten._local_scalar_dense"


class DispatchCounter(TorchDispatchMode):
    """A TorchDispatchMode that counts the launching ops and host syncs it sees."""

    def __init__(self):
        super().__init__()
        self.by_op = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        impl = python_implementation(func._schema.name) if func.namespace == "fused_resnet" \
            else None
        if impl is not None:   # look inside: count what the operator dispatches
            with self:
                return impl(*args, **kwargs)
        name = str(func.overloadpacket)
        if not func.is_view and name not in NOT_LAUNCHING:
            self.by_op[name] += 1
        return func(*args, **kwargs)

    @property
    def launches(self) -> int:
        """Ops that launch work, host syncs included."""
        return sum(self.by_op.values())

    @property
    def syncs(self) -> int:
        return self.by_op.get(HOST_SYNC, 0)
