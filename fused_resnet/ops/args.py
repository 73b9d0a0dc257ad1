"""The arguments of one convolution and one batch norm, as the block operators see
them, with the little per-channel math of batch norm (done on [C] vectors, in the
accumulation dtype) in one place."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch
from torch import Tensor


@dataclass(frozen=True)
class ConvArgs:
    stride: tuple
    padding: tuple
    dilation: tuple
    groups: int

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
    # Sync BN (fused_resnet/backends/collectives.py): the key of the process group over which the
    # batch statistics and the backward's sums are merged; "" = this process's batch only.
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

    def invstd(self, var: Tensor) -> Tensor:
        return torch.rsqrt(var + self.eps)

    def scale_shift(self, mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
        """y = x*scale + shift == gamma*(x - mean)*invstd + beta."""
        var, _ = split_count(var, mean.numel())   # sync BN: var carries the global count
        scale = self.invstd(var)
        if self.gamma is not None:
            scale = scale * self.gamma.to(scale.dtype)
        shift = -mean * scale
        if self.beta is not None:
            shift = shift + self.beta.to(scale.dtype)
        return scale, shift

    def grad_coefficients(self, x: Tensor, var: Tensor, sum_g: Tensor, sum_g_xmu: Tensor,
                          local_sums: Optional[tuple] = None):
        """Per-channel a, b, d of grad_x = a*g + b*(x - mean) + d, and d gamma, d beta.

        With batch statistics (n values per channel):
            grad_x = gamma*invstd * (g - sum_g/n - (x - mean)*invstd^2*sum_g_xmu/n)
        with running statistics the mean and variance are constants: grad_x = gamma*invstd*g.

        Sync BN: sum_g/sum_g_xmu are the group's, var carries the global count n as a
        trailing element, and local_sums = this rank's (sum_g, sum_g_xmu) give d gamma and
        d beta (DDP averages them across ranks like every other parameter gradient).
        """
        var, count = split_count(var, x.shape[1])
        invstd = self.invstd(var)
        k = invstd * self.gamma.to(invstd.dtype) if self.gamma is not None else invstd
        if local_sums is not None:
            sum_g_param, sum_g_xmu_param = local_sums
        else:
            sum_g_param, sum_g_xmu_param = sum_g, sum_g_xmu
        if self.use_batch_stats:
            n = x.numel() // x.shape[1] if count is None else count
            b = -k * invstd * invstd * sum_g_xmu / n
            d = -k * sum_g / n
        else:
            b = torch.zeros_like(k)
            d = torch.zeros_like(k)
        grad_gamma = (sum_g_xmu_param * invstd).to(self.gamma.dtype) \
            if self.gamma is not None else None
        grad_beta = sum_g_param.to(self.beta.dtype) if self.beta is not None else None
        return k, b, d, grad_gamma, grad_beta


def split_count(var: Tensor, c: int) -> tuple:
    """(biased var [C], global count or None): with sync BN the op's var output has C+1
    elements, the last being the number of values per channel over all ranks."""
    if var.dim() == 1 and var.numel() == c + 1:
        return var[:c], var[c]
    return var, None
