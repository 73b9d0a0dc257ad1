"""The fused operators written the plain way: eager PyTorch (F.conv2d, F.batch_norm,
F.relu) with autograd doing the backward. This is the oracle every backend's operators
are tested against; it shares no code with them.

Each function has the signature and outputs of the operator of the same name in
fused_resnet.ops (batch statistics are returned, not written to the buffers).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def _stats(z: Tensor, use_batch: bool, running_mean, running_var):
    acc = torch.float64 if z.dtype == torch.float64 else torch.float32
    if use_batch:
        zd = z.detach().to(acc)
        return zd.mean((0, 2, 3)), zd.var((0, 2, 3), unbiased=False)
    return running_mean.detach().to(acc).clone(), running_var.detach().to(acc).clone()


def _bn(z: Tensor, gamma, beta, running_mean, running_var, training: bool, eps: float):
    use_batch = training or running_mean is None
    out = F.batch_norm(z, None if use_batch else running_mean, None if use_batch else running_var,
                       gamma, beta, use_batch, 0.0, eps)
    return out, _stats(z, use_batch, running_mean, running_var)


def conv_bn_relu(x, weight, gamma, beta, running_mean, running_var, stride, padding, dilation,
                 groups, training, eps, relu):
    z = F.conv2d(x, weight, None, stride, padding, dilation, groups)
    out, (mean, var) = _bn(z, gamma, beta, running_mean, running_var, training, eps)
    return (F.relu(out) if relu else out), z, mean, var


def bn_relu_conv(z, gamma, beta, running_mean, running_var, weight, stride, padding, dilation,
                 groups, training, eps, relu):
    y, (mean, var) = _bn(z, gamma, beta, running_mean, running_var, training, eps)
    y = F.relu(y) if relu else y
    # the affine form of BN the op also returns: bn(z) = z*scale + shift
    scale = 1 / torch.sqrt(var + eps) * (gamma.detach().to(var.dtype) if gamma is not None else 1)
    shift = (beta.detach().to(var.dtype) if beta is not None else 0) - mean * scale
    return F.conv2d(y, weight, None, stride, padding, dilation, groups), mean, var, scale, shift


def bn_add_relu(z, gamma, beta, running_mean, running_var, shortcut: Optional[Tensor],
                z_d: Optional[Tensor], gamma_d, beta_d, running_mean_d, running_var_d,
                training, eps, eps_d, relu):
    out, (mean, var) = _bn(z, gamma, beta, running_mean, running_var, training, eps)
    mean_d = var_d = mean.new_empty(0)
    if shortcut is not None:
        out = out + shortcut
    if z_d is not None:
        s, (mean_d, var_d) = _bn(z_d, gamma_d, beta_d, running_mean_d, running_var_d, training,
                                 eps_d)
        out = out + s
    return (F.relu(out) if relu else out), mean, var, mean_d, var_d


def conv_bias_act(x, weight, bias, residual, stride, padding, dilation, groups, relu):
    out = F.conv2d(x, weight, None, stride, padding, dilation, groups)
    if bias is not None:
        out = out + bias.to(out.dtype).view(1, -1, 1, 1)
    if residual is not None:
        out = out + residual
    return F.relu(out) if relu else out


def update_running_stats(running_mean, running_var, num_batches_tracked, mean, var, count,
                         momentum):
    """As torch.nn.BatchNorm2d in training mode, through F.batch_norm's own update on a
    tensor with exactly this batch mean and variance is not possible: write it out."""
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    if running_mean is None:
        return
    factor = momentum if momentum is not None else 1.0 / float(num_batches_tracked)
    running_mean.mul_(1 - factor).add_(mean.to(running_mean.dtype) * factor)
    running_var.mul_(1 - factor).add_((var * count / (count - 1)).to(running_var.dtype) * factor)
