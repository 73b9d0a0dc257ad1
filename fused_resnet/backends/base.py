"""The block math, written once on top of the primitives.

A backend runs the four primitives (csrc/ops.cpp) and the two option-A primitives
(csrc/option_a.cpp); `Backend` turns them into the forward and backward of every block
operator (convolutions through ATen, so cuDNN on a GPU). A backend with its own
convolutions (Triton) overrides the block methods it fuses further. The contract a new
backend fulfils: backends/README.md.

Per-channel tensors (mean, var, coefficients) are in the accumulation dtype.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from . import collectives
from .collectives import split_count
from .conventions import acc_dtype, memory_format
from .primitives import option_a_shortcut, option_a_shortcut_backward


class BNGrads(NamedTuple):
    """The gradients of one BN backward (None where there is nothing to give)."""
    grad_x: torch.Tensor                     # the BN input (pre-BN tensor z)
    grad_gamma: Optional[torch.Tensor]
    grad_beta: Optional[torch.Tensor]
    grad_shortcut: Optional[torch.Tensor]    # the identity (or option-A) shortcut's input
    grad_z_d: Optional[torch.Tensor]         # the projection's pre-BN input
    grad_gamma_d: Optional[torch.Tensor]
    grad_beta_d: Optional[torch.Tensor]


class Backend:
    """A backend runs the primitives; the block operators below are written once on top
    of them. Subclasses set `name` and implement the primitives and `unavailable_reason`."""

    name = "abstract"

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        """Why this backend cannot run on `device` (None when it can)."""
        raise NotImplementedError

    # -- the four primitives (schemas and math: csrc/ops.cpp) --
    def bn_stats(self, x):
        raise NotImplementedError

    def bn_apply(self, x, scale, shift, residual, x_d, scale_d, shift_d, relu):
        raise NotImplementedError

    def bn_backward_reduce(self, grad_out, out, x, mean, x_d, mean_d):
        raise NotImplementedError

    def bn_backward_apply(self, grad_out, out, x, mean, a, b, d, x_d, mean_d, a_d, b_d, d_d,
                          grad_residual):
        raise NotImplementedError

    # -- the option-A primitives (csrc/option_a.cpp). By default the common primitives
    # with the shortcut (and its gradient) materialised; backends with kernels fuse them.
    def bn_apply_option_a(self, x, scale, shift, shortcut, stride, relu):
        residual = option_a_shortcut(shortcut, x.shape[1], stride)
        residual = residual.contiguous(memory_format=memory_format(x))
        return self.bn_apply(x, scale, shift, residual, None, None, None, relu)

    def bn_backward_apply_option_a(self, grad_out, out, x, mean, a, b, d, shortcut_size,
                                   stride):
        grad_x, g = self.bn_backward_apply(grad_out, out, x, mean, a, b, d, None, None, None,
                                           None, None, True)
        return grad_x, option_a_shortcut_backward(g, shortcut_size, stride)

    # -- convolution --
    def conv(self, x, weight, conv):
        return torch.ops.aten.convolution(x, weight, None, *conv.args)

    def conv_backward(self, grad, x, weight, conv, need_x, need_w):
        gx, gw, _ = torch.ops.aten.convolution_backward(
            grad, x, weight, None, *conv.args, [need_x, need_w, False])
        return gx, gw

    # -- the per-channel math of batch norm, on [C] vectors in the accumulation dtype --
    @staticmethod
    def scale_shift(bn, mean, var):
        """y = x*scale + shift == gamma*(x - mean)*invstd + beta."""
        var, _ = split_count(var, mean.numel())   # sync BN: var carries the global count
        scale = torch.rsqrt(var + bn.eps)
        if bn.gamma is not None:
            scale = scale * bn.gamma.to(scale.dtype)
        shift = -mean * scale
        if bn.beta is not None:
            shift = shift + bn.beta.to(scale.dtype)
        return scale, shift

    @staticmethod
    def grad_coefficients(bn, x, var, sum_g, sum_g_xmu, local_sums=None):
        """Per-channel a, b, d of grad_x = a*g + b*(x - mean) + d, and d gamma, d beta.

        With batch statistics (n values per channel):
            grad_x = gamma*invstd * (g - sum_g/n - (x - mean)*invstd^2*sum_g_xmu/n)
        with running statistics the mean and variance are constants: grad_x = gamma*invstd*g.

        Sync BN: sum_g/sum_g_xmu are the group's, var carries the global count n as a
        trailing element, and local_sums = this rank's (sum_g, sum_g_xmu) give d gamma and
        d beta (DDP averages them across ranks like every other parameter gradient).
        """
        var, count = split_count(var, x.shape[1])
        invstd = torch.rsqrt(var + bn.eps)
        k = invstd * bn.gamma.to(invstd.dtype) if bn.gamma is not None else invstd
        sum_g_param, sum_g_xmu_param = local_sums if local_sums is not None else (sum_g,
                                                                                   sum_g_xmu)
        if bn.use_batch_stats:
            n = x.numel() // x.shape[1] if count is None else count
            b = -k * invstd * invstd * sum_g_xmu / n
            d = -k * sum_g / n
        else:
            b = torch.zeros_like(k)
            d = torch.zeros_like(k)
        grad_gamma = (sum_g_xmu_param * invstd).to(bn.gamma.dtype) if bn.gamma is not None \
            else None
        grad_beta = sum_g_param.to(bn.beta.dtype) if bn.beta is not None else None
        return k, b, d, grad_gamma, grad_beta

    # -- block operators: forward returns what the op saves, backward the gradients --
    def batch_stats(self, z):
        """bn_stats, except for an empty batch: zeros, so that the output stays finite and
        the gamma / beta gradients are zero, as eager's (the running statistics are then
        left alone: ops.update_running_stats)."""
        if z.numel() == 0:
            zeros = z.new_zeros(z.shape[1], dtype=acc_dtype(z.dtype))
            return zeros, zeros.clone()
        return self.bn_stats(z)

    def stats(self, z, bn):
        """Batch statistics in training mode, running statistics otherwise."""
        if bn.synced:  # sync BN: merged over the ranks (one all-reduce); var gets the count
            return collectives.sync_stats(bn.sync, z, [self.batch_stats(z)])
        if bn.use_batch_stats:
            return self.batch_stats(z)
        acc = acc_dtype(z.dtype)
        return bn.running_mean.to(acc).clone(), bn.running_var.to(acc).clone()

    def conv_bn_relu_forward(self, x, weight, conv, bn, relu):
        z = self.conv(x, weight, conv)
        mean, var = self.stats(z, bn)
        scale, shift = self.scale_shift(bn, mean, var)
        out = self.bn_apply(z, scale, shift, None, None, None, None, relu)
        return out, z, mean, var

    def conv_bn_relu_backward(self, grad_out, grad_z, x, weight, z, out, mean, var, conv, bn,
                              relu, need_x, need_w):
        g = self.bn_backward(grad_out, out if relu else None, z, mean, var, bn)
        dz = g.grad_x if grad_z is None else g.grad_x + grad_z
        dx, dw = self.conv_backward(dz, x, weight, conv, need_x, need_w)
        return dx, dw, g.grad_gamma, g.grad_beta

    def bn_relu_conv_forward(self, z, weight, conv, bn, relu):
        mean, var = self.stats(z, bn)
        scale, shift = self.scale_shift(bn, mean, var)
        y = self.bn_apply(z, scale, shift, None, None, None, None, relu)
        return self.conv(y, weight, conv), mean, var

    def bn_relu_conv_backward(self, grad_out, z, weight, mean, var, conv, bn, relu,
                              need_z, need_w):
        # The normalised activation was not saved: recompute it for the weight gradient.
        scale, shift = self.scale_shift(bn, mean, var)
        y = self.bn_apply(z, scale, shift, None, None, None, None, relu)
        dy, dw = self.conv_backward(grad_out, y, weight, conv, True, need_w)
        g = self.bn_backward(dy, y if relu else None, z, mean, var, bn)
        return g.grad_x, dw, g.grad_gamma, g.grad_beta

    def bn_add_relu_forward(self, z, bn, shortcut, z_d, bn_d, relu):
        if z_d is not None and bn.synced and bn_d.synced:
            # sync BN: the block's and the projection's statistics in one all-reduce
            mean, var, mean_d, var_d = collectives.sync_stats(
                bn.sync, z, [self.batch_stats(z), self.batch_stats(z_d)])
        else:
            mean, var = self.stats(z, bn)
        scale, shift = self.scale_shift(bn, mean, var)
        if z_d is None:
            out = self.bn_apply(z, scale, shift, shortcut, None, None, None, relu)
            return out, mean, var, None, None
        if not (bn.synced and bn_d.synced):
            mean_d, var_d = self.stats(z_d, bn_d)
        scale_d, shift_d = self.scale_shift(bn_d, mean_d, var_d)
        out = self.bn_apply(z, scale, shift, None, z_d, scale_d, shift_d, relu)
        return out, mean, var, mean_d, var_d

    def bn_add_relu_backward(self, grad_out, out, z, mean, var, bn, has_shortcut,
                             z_d, mean_d, var_d, bn_d, relu):
        return self.bn_backward(grad_out, out if relu else None, z, mean, var, bn,
                                grad_residual=has_shortcut, x_d=z_d, mean_d=mean_d,
                                var_d=var_d, bn_d=bn_d)

    def conv_bias_act_forward(self, x, weight, bias, residual, conv, relu):
        z = self.conv(x, weight, conv)
        acc = acc_dtype(z.dtype)
        ones = torch.ones(z.shape[1], dtype=acc, device=z.device)
        shift = bias.to(acc) if bias is not None else torch.zeros_like(ones)
        if residual is not None:
            residual = residual.contiguous(memory_format=memory_format(z))
        return self.bn_apply(z, ones, shift, residual, None, None, None, relu)

    def conv_bias_act_backward(self, grad_out, out, x, weight, conv, relu, need_x, need_w,
                               need_bias, need_residual):
        mask_src = out if relu else None
        acc = acc_dtype(out.dtype)
        c = out.shape[1]
        ones = torch.ones(c, dtype=acc, device=out.device)
        zeros = torch.zeros(c, dtype=acc, device=out.device)
        g, _ = self.bn_backward_apply(grad_out, mask_src, out, zeros, ones, zeros, zeros,
                                      None, None, None, None, None, False)
        dbias = self.bn_backward_reduce(grad_out, mask_src, out, zeros, None, None)[0] \
            if need_bias else None
        dx, dw = self.conv_backward(g, x, weight, conv, need_x, need_w)
        return dx, dw, dbias, (g if need_residual else None)

    def bn_backward(self, grad_out, out, x, mean, var, bn, grad_residual=False,
                    x_d=None, mean_d=None, var_d=None, bn_d=None):
        """BN (+ReLU mask, + identity or projected shortcut) backward: one reduction pass
        and one elementwise pass for both branches."""
        sum_g, sum_g_xmu, sum_g_xmu_d = self.bn_backward_reduce(grad_out, out, x, mean, x_d,
                                                                mean_d)
        local = local_d = None
        sync = bn.sync if bn.synced else (bn_d.sync if bn_d is not None and bn_d.synced else "")
        if sync:  # sync BN: the sums of all ranks for grad_x (one all-reduce for both BNs);
            # this rank's sums for d gamma / d beta, which DDP averages
            local, local_d = (sum_g, sum_g_xmu), (sum_g, sum_g_xmu_d)
            sum_g, sum_g_xmu, sum_g_xmu_d = collectives.sync_sums(sync, (sum_g, sum_g_xmu,
                                                                         sum_g_xmu_d))
        a, b, d, grad_gamma, grad_beta = self.grad_coefficients(bn, x, var, sum_g, sum_g_xmu,
                                                                local)
        a_d = b_d = d_d = grad_gamma_d = grad_beta_d = None
        if x_d is not None:
            a_d, b_d, d_d, grad_gamma_d, grad_beta_d = self.grad_coefficients(
                bn_d, x_d, var_d, sum_g, sum_g_xmu_d, local_d)
        grad_x, grad_second = self.bn_backward_apply(grad_out, out, x, mean, a, b, d, x_d,
                                                     mean_d, a_d, b_d, d_d, grad_residual)
        return BNGrads(grad_x, grad_gamma, grad_beta,
                       grad_second if grad_residual and x_d is None else None,
                       grad_second if x_d is not None else None, grad_gamma_d, grad_beta_d)

    def bn_add_relu_option_a_forward(self, z, bn, shortcut, stride, relu):
        mean, var = self.stats(z, bn)
        scale, shift = self.scale_shift(bn, mean, var)
        return self.bn_apply_option_a(z, scale, shift, shortcut, stride, relu), mean, var

    def bn_add_relu_option_a_backward(self, grad_out, out, z, mean, var, bn, shortcut_size,
                                      stride):
        sum_g, sum_g_xmu, _ = self.bn_backward_reduce(grad_out, out, z, mean, None, None)
        a, b, d, grad_gamma, grad_beta = self.grad_coefficients(bn, z, var, sum_g, sum_g_xmu)
        grad_z, grad_s = self.bn_backward_apply_option_a(grad_out, out, z, mean, a, b, d,
                                                         list(shortcut_size), stride)
        return BNGrads(grad_z, grad_gamma, grad_beta, grad_s, None, None, None)

    def __repr__(self) -> str:
        return f"<fused_resnet backend {self.name!r}>"
