"""The block math, written once on top of the primitives.

A backend runs the primitives (csrc/ops.cpp) and the two option-A primitives
(csrc/option_a.cpp); `Backend` turns them into the forward and backward of every block
operator (convolutions through ATen, so cuDNN on a GPU). A backend with its own
convolutions (Triton) overrides the block methods it fuses further. The contract a new
backend fulfils: backends/README.md.

Four passes over a tensor are required (bn_stats, bn_apply, bn_backward_reduce,
bn_backward_apply). The per-channel steps - the finish steps that turn statistics into
scale / shift and gradient sums into coefficients, and the running-statistics update -
have composite defaults here in a few PyTorch ops; a backend with kernels for them
(bn_stats_affine, bn_scale_shift, bn_backward_coefficients, bn_update_running_stats,
bn_fold) overrides them, so that a step launches no more kernels than eager's.

Per-channel tensors (mean, var, coefficients) are in the accumulation dtype. Nothing
here reads a tensor back to the host: a step stays CUDA-graph capturable.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from . import collectives, primitives
from .collectives import split_count
from .conventions import acc_dtype, memory_format, reduce_dims
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


class Stats(NamedTuple):
    """What a BN forward uses: the statistics and the scale / shift they give."""
    mean: torch.Tensor
    var: torch.Tensor        # sync BN: C+1 elements, the last the global count
    scale: torch.Tensor
    shift: torch.Tensor


def _param_grad(row: torch.Tensor, param: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if param is None else row.to(param.dtype)


class Backend:
    """A backend runs the primitives; the block operators below are written once on top
    of them. Subclasses set `name` and implement the primitives and `unavailable_reason`."""

    name = "abstract"
    # eval BN folded into the convolution (its epilogue adds the bias, residual and ReLU)
    # rather than applied after it in one pass: worth it only with a fused epilogue
    folds_eval_bn = False

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        """Why this backend cannot run on `device` (None when it can)."""
        raise NotImplementedError

    # -- the four passes (schemas and math: csrc/ops.cpp) --
    def bn_stats(self, x):
        raise NotImplementedError

    def bn_apply(self, x, scale, shift, residual, x_d, scale_d, shift_d, relu):
        raise NotImplementedError

    def bn_backward_reduce(self, grad_out, out, x, mean, x_d, mean_d):
        raise NotImplementedError

    def bn_backward_apply(self, grad_out, out, x, mean, a, b, d, x_d, mean_d, a_d, b_d, d_d,
                          grad_residual):
        raise NotImplementedError

    # -- the per-channel steps: composite defaults, kernels where a backend has them --
    def bn_scale_shift(self, mean, var, gamma, beta, eps):
        return primitives.bn_scale_shift(mean, var, gamma, beta, eps)

    def bn_stats_affine(self, x, gamma, beta, eps):
        mean, var = self.bn_stats(x)
        return (mean, var) + tuple(self.bn_scale_shift(mean, var, gamma, beta, eps))

    def bn_backward_coefficients(self, grad_out, out, x, mean, var, gamma, eps,
                                 use_batch_stats, x_d, mean_d, var_d, gamma_d, eps_d):
        sum_g, sum_g_xmu, sum_g_xmu_d = self.bn_backward_reduce(grad_out, out, x, mean, x_d,
                                                                mean_d)
        count = x.numel() // x.shape[1] if x.shape[1] else 0
        coef = primitives.grad_coefficients(sum_g, sum_g_xmu, var, gamma, eps, count,
                                            use_batch_stats)
        if x_d is None:
            return coef, coef.new_empty(0)
        return coef, primitives.grad_coefficients(sum_g, sum_g_xmu_d, var_d, gamma_d, eps_d,
                                                  count, use_batch_stats)

    def bn_update_running_stats(self, running_means, running_vars, num_batches_tracked, means,
                                variances, counts, momenta, cumulative):
        for layer in zip(running_means, running_vars, num_batches_tracked, means, variances,
                         counts, momenta, cumulative):
            primitives.bn_update_running_stats(*layer)

    def bn_fold(self, weight, gamma, beta, running_mean, running_var, eps, dtype):
        return primitives.bn_fold(weight, gamma, beta, running_mean, running_var, eps, dtype)

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
    def conv(self, x, weight, conv, bias=None):
        return torch.ops.aten.convolution(x, weight, bias, *conv.args)

    def conv_backward(self, grad, x, weight, conv, need_x, need_w):
        gx, gw, _ = torch.ops.aten.convolution_backward(
            grad, x, weight, None, *conv.args, [need_x, need_w, False])
        return gx, gw

    # -- batch statistics --
    def stats(self, z, bn) -> Stats:
        """Batch statistics in training mode (of the whole process group with sync BN),
        running statistics otherwise; with the scale / shift they give."""
        if bn.synced:  # merged over the ranks (one all-reduce); var gets the count
            mean, var = collectives.sync_stats(bn.sync, z, [self.bn_stats(z)])
            return Stats(mean, var, *self.bn_scale_shift(mean, split_count(var, z.shape[1])[0],
                                                         bn.gamma, bn.beta, bn.eps))
        if not bn.use_batch_stats:
            acc = acc_dtype(z.dtype)
            mean, var = bn.running_mean.to(acc).clone(), bn.running_var.to(acc).clone()
            return Stats(mean, var, *self.bn_scale_shift(mean, var, bn.gamma, bn.beta, bn.eps))
        if z.numel() == 0:
            # an empty batch: zero statistics keep the output finite and the gamma / beta
            # gradients zero, as eager's (the running statistics are left alone)
            mean, var = (z.new_zeros(z.shape[1], dtype=acc_dtype(z.dtype)) for _ in range(2))
            return Stats(mean, var, *self.bn_scale_shift(mean, var, bn.gamma, bn.beta, bn.eps))
        return Stats(*self.bn_stats_affine(z, bn.gamma, bn.beta, bn.eps))

    def projection_stats(self, z, bn, z_d, bn_d) -> tuple:
        """The statistics of a block's BN and of its projection shortcut's BN; with sync BN
        merged in one all-reduce."""
        if not (bn.synced and bn_d.synced):
            return self.stats(z, bn), self.stats(z_d, bn_d)
        mean, var, mean_d, var_d = collectives.sync_stats(
            bn.sync, z, [self.bn_stats(z), self.bn_stats(z_d)])
        c = z.shape[1]
        return (Stats(mean, var, *self.bn_scale_shift(mean, split_count(var, c)[0], bn.gamma,
                                                      bn.beta, bn.eps)),
                Stats(mean_d, var_d, *self.bn_scale_shift(mean_d, split_count(var_d, c)[0],
                                                          bn_d.gamma, bn_d.beta, bn_d.eps)))

    def update_running_stats(self, *lists):
        """What training-mode BN does to the buffers of several layers (ops.update_running_stats)."""
        self.bn_update_running_stats(*lists)

    # -- block operators: forward returns what the op saves, backward the gradients --
    def conv_bn_relu_forward(self, x, weight, conv, bn, relu):
        z = self.conv(x, weight, conv)
        s = self.stats(z, bn)
        out = self.bn_apply(z, s.scale, s.shift, None, None, None, None, relu)
        return out, z, s.mean, s.var

    def conv_bn_relu_backward(self, grad_out, grad_z, x, weight, z, out, mean, var, conv, bn,
                              relu, need_x, need_w):
        g = self.bn_backward(grad_out, out if relu else None, z, mean, var, bn)
        dz = g.grad_x if grad_z is None else g.grad_x + grad_z
        dx, dw = self.conv_backward(dz, x, weight, conv, need_x, need_w)
        return dx, dw, g.grad_gamma, g.grad_beta

    def bn_relu_conv_forward(self, z, weight, conv, bn, relu):
        s = self.stats(z, bn)
        y = self.bn_apply(z, s.scale, s.shift, None, None, None, None, relu)
        return self.conv(y, weight, conv), s.mean, s.var, s.scale, s.shift

    def bn_relu_conv_backward(self, grad_out, z, weight, mean, var, scale, shift, conv, bn,
                              relu, need_z, need_w):
        # The normalised activation was not saved: recompute it for the weight gradient.
        y = self.bn_apply(z, scale, shift, None, None, None, None, relu)
        dy, dw = self.conv_backward(grad_out, y, weight, conv, True, need_w)
        g = self.bn_backward(dy, y if relu else None, z, mean, var, bn)
        return g.grad_x, dw, g.grad_gamma, g.grad_beta

    def bn_add_relu_forward(self, z, bn, shortcut, z_d, bn_d, relu):
        if z_d is None:
            s = self.stats(z, bn)
            out = self.bn_apply(z, s.scale, s.shift, shortcut, None, None, None, relu)
            return out, s.mean, s.var, None, None
        s, s_d = self.projection_stats(z, bn, z_d, bn_d)
        out = self.bn_apply(z, s.scale, s.shift, None, z_d, s_d.scale, s_d.shift, relu)
        return out, s.mean, s.var, s_d.mean, s_d.var

    def bn_add_relu_backward(self, grad_out, out, z, mean, var, bn, has_shortcut,
                             z_d, mean_d, var_d, bn_d, relu):
        return self.bn_backward(grad_out, out if relu else None, z, mean, var, bn,
                                grad_residual=has_shortcut, x_d=z_d, mean_d=mean_d,
                                var_d=var_d, bn_d=bn_d)

    def conv_bias_act_forward(self, x, weight, bias, residual, conv, relu):
        out = self.conv(x, weight, conv, bias)   # the bias in the convolution itself
        if residual is not None:
            out = out.add_(residual)
        return out.relu_() if relu else out

    def conv_bias_act_backward(self, grad_out, out, x, weight, conv, relu, need_x, need_w,
                               need_bias, need_residual):
        # ReLU's backward as eager's: zero where out <= 0 (a NaN output passes its gradient)
        g = torch.ops.aten.threshold_backward(grad_out, out, 0) if relu else grad_out
        dbias = g.sum(reduce_dims(g), dtype=acc_dtype(g.dtype)) if need_bias else None
        dx, dw = self.conv_backward(g, x, weight, conv, need_x, need_w)
        return dx, dw, dbias, (g if need_residual else None)

    def bn_backward(self, grad_out, out, x, mean, var, bn, grad_residual=False,
                    x_d=None, mean_d=None, var_d=None, bn_d=None):
        """BN (+ReLU mask, + identity or projected shortcut) backward: one reduction pass
        (with the per-channel finish step) and one elementwise pass for both branches."""
        sync = bn.sync if bn.synced else (bn_d.sync if bn_d is not None and bn_d.synced else "")
        if sync:
            coef, coef_d = self.synced_coefficients(sync, grad_out, out, x, mean, var, bn,
                                                    x_d, mean_d, var_d, bn_d)
        else:
            coef, coef_d = self.bn_backward_coefficients(
                grad_out, out, x, mean, var, bn.gamma, bn.eps, bn.use_batch_stats, x_d, mean_d,
                var_d, bn_d.gamma if bn_d is not None else None,
                bn_d.eps if bn_d is not None else 0.0)
        a_d = b_d = d_d = None
        if x_d is not None:
            a_d, b_d, d_d = coef_d[0], coef_d[1], coef_d[2]
        grad_x, grad_second = self.bn_backward_apply(grad_out, out, x, mean, coef[0], coef[1],
                                                     coef[2], x_d, mean_d, a_d, b_d, d_d,
                                                     grad_residual)
        return BNGrads(grad_x, _param_grad(coef[3], bn.gamma), _param_grad(coef[4], bn.beta),
                       grad_second if grad_residual and x_d is None else None,
                       grad_second if x_d is not None else None,
                       _param_grad(coef_d[3], bn_d.gamma) if x_d is not None else None,
                       _param_grad(coef_d[4], bn_d.beta) if x_d is not None else None)

    def synced_coefficients(self, sync, grad_out, out, x, mean, var, bn, x_d, mean_d, var_d,
                            bn_d):
        """Sync BN: the gradient sums of all ranks (one all-reduce for both BNs) for grad_x,
        this rank's for d gamma / d beta (DDP averages those across ranks like every other
        parameter gradient); var carries the global count."""
        sums = self.bn_backward_reduce(grad_out, out, x, mean, x_d, mean_d)
        sum_g, sum_g_xmu, sum_g_xmu_d = collectives.sync_sums(sync, sums)
        c = x.shape[1]
        var, count = split_count(var, c)
        coef = primitives.grad_coefficients(sum_g, sum_g_xmu, var, bn.gamma, bn.eps, count,
                                            bn.use_batch_stats)
        local = primitives.grad_coefficients(sums[0], sums[1], var, bn.gamma, bn.eps, count,
                                             bn.use_batch_stats)
        coef = torch.cat([coef[:3], local[3:]])
        if x_d is None:
            return coef, coef.new_empty(0)
        var_d, _ = split_count(var_d, c)
        coef_d = primitives.grad_coefficients(sum_g, sum_g_xmu_d, var_d, bn_d.gamma, bn_d.eps,
                                              count, bn_d.use_batch_stats)
        local_d = primitives.grad_coefficients(sums[0], sums[2], var_d, bn_d.gamma, bn_d.eps,
                                               count, bn_d.use_batch_stats)
        return coef, torch.cat([coef_d[:3], local_d[3:]])

    def bn_add_relu_option_a_forward(self, z, bn, shortcut, stride, relu):
        s = self.stats(z, bn)
        return self.bn_apply_option_a(z, s.scale, s.shift, shortcut, stride, relu), s.mean, s.var

    def bn_add_relu_option_a_backward(self, grad_out, out, z, mean, var, bn, shortcut_size,
                                      stride):
        coef, _ = self.bn_backward_coefficients(grad_out, out, z, mean, var, bn.gamma, bn.eps,
                                                bn.use_batch_stats, None, None, None, None, 0.0)
        grad_z, grad_s = self.bn_backward_apply_option_a(grad_out, out, z, mean, coef[0],
                                                         coef[1], coef[2], list(shortcut_size),
                                                         stride)
        return BNGrads(grad_z, _param_grad(coef[3], bn.gamma), _param_grad(coef[4], bn.beta),
                       grad_s, None, None, None)

    def __repr__(self) -> str:
        return f"<fused_resnet backend {self.name!r}>"
