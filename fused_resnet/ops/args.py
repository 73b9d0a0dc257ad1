"""The arguments of one convolution and one batch norm, as the block operators hand
them to a backend."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Sequence

from torch import Tensor


@dataclass(frozen=True)
class ConvArgs:
    stride: tuple
    padding: tuple
    dilation: tuple
    groups: int

    @classmethod
    def of(cls, stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
           groups: int) -> "ConvArgs":
        """From an op's list arguments."""
        return cls(tuple(stride), tuple(padding), tuple(dilation), int(groups))

    @property
    def args(self) -> tuple:
        """The trailing arguments of aten.convolution / aten.convolution_backward."""
        return (list(self.stride), list(self.padding), list(self.dilation), False, [0, 0],
                self.groups)


@dataclass(frozen=True)
class BNArgs:
    gamma: Optional[Tensor]
    beta: Optional[Tensor]
    running_mean: Optional[Tensor]
    running_var: Optional[Tensor]
    use_batch_stats: bool
    eps: float
    # Sync BN (fused_resnet/backends/collectives.py): the key of the process group over
    # which the batch statistics and the backward's sums are merged; "" = this process's
    # batch only.
    sync: str = ""

    @classmethod
    def of(cls, gamma, beta, running_mean, running_var, training: bool, eps: float,
           sync: str = "") -> "BNArgs":
        # as torch.nn.BatchNorm: batch statistics in training, or when none are tracked
        return cls(gamma, beta, running_mean, running_var,
                   bool(training) or running_mean is None, float(eps), str(sync))

    def without_tensors(self) -> "BNArgs":
        """What an autograd ctx keeps: the flags, not the tensors (gamma and beta go
        through save_for_backward; the running statistics are not needed)."""
        return replace(self, gamma=None, beta=None, running_mean=None, running_var=None)

    def with_affine(self, gamma: Optional[Tensor], beta: Optional[Tensor]) -> "BNArgs":
        return replace(self, gamma=gamma, beta=beta)

    @property
    def synced(self) -> bool:
        """Sync BN with batch statistics: the statistics and gradient sums are global."""
        return bool(self.sync) and self.use_batch_stats
