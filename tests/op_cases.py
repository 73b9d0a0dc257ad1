"""The inputs of the block-operator tests, shared by the op tests (tests/ops) and the
backend tests (tests/backends): random, BN far from the identity, odd shapes."""
import math

import torch

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
FORMATS = [torch.contiguous_format, torch.channels_last]


def activation(n, c, h, w, dtype, fmt, scale=1.0, offset=0.0):
    x = torch.randn(n, c, h, w, dtype=torch.float64) * scale + offset
    return x.to(dtype).contiguous(memory_format=fmt).requires_grad_()


def bn_params(c, dtype=torch.float32):
    """gamma, beta, running_mean, running_var: random, BN far from the identity."""
    return (torch.rand(c, dtype=dtype).add_(0.5).requires_grad_(),
            torch.randn(c, dtype=dtype).requires_grad_(),
            torch.randn(c, dtype=dtype), torch.rand(c, dtype=dtype).add_(0.5))


def conv_weight(cout, cin, k, dtype, groups=1):
    w = torch.randn(cout, cin // groups, k, k, dtype=torch.float64) / math.sqrt(cin * k * k / groups)
    return w.to(dtype).requires_grad_()


def param_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# --- case builders: (args, names of the differentiable args) --------------------------------

def case_conv_bn_relu(dtype, fmt, training=True, stride=2, relu=True):
    x = activation(3, 3, 11, 9, dtype, fmt)
    w = conv_weight(5, 3, 7 if stride == 2 else 3, dtype)
    pad = 3 if stride == 2 else 1
    return (x, w, *bn_params(5, param_dtype(dtype)), [stride, stride], [pad, pad], [1, 1], 1,
            training, 1e-5, relu)


def case_bn_relu_conv(dtype, fmt, training=True, k=3, stride=1, groups=1, dilation=1):
    z = activation(2, 6, 7, 5, dtype, fmt, scale=2.0, offset=0.5)
    w = conv_weight(4 if groups == 1 else 6, 6, k, dtype, groups)
    pad = dilation * (k // 2)
    return (z, *bn_params(6, param_dtype(dtype)), w, [stride, stride], [pad, pad],
            [dilation, dilation], groups, training, 1e-5, True)


def case_bn_add_relu(dtype, fmt, training=True, projection=False, identity=True):
    z = activation(3, 7, 5, 3, dtype, fmt, scale=1.5, offset=-0.3)
    pd = param_dtype(dtype)
    shortcut = activation(3, 7, 5, 3, dtype, fmt) if identity and not projection else None
    if projection:
        z_d = activation(3, 7, 5, 3, dtype, fmt, scale=0.7, offset=0.2)
        proj = (z_d, *bn_params(7, pd))
    else:
        proj = (None, None, None, None, None)
    return (z, *bn_params(7, pd), shortcut, *proj, training, 1e-5, 1e-3, True)


def case_conv_bias_act(dtype, fmt, residual=True, relu=True, stride=2):
    x = activation(2, 5, 9, 7, dtype, fmt)
    w = conv_weight(6, 5, 3, dtype)
    out_hw = ((9 + 2 - 3) // stride + 1, (7 + 2 - 3) // stride + 1)
    res = activation(2, 6, *out_hw, dtype, fmt) if residual else None
    bias = torch.randn(6, dtype=param_dtype(dtype)).requires_grad_()
    return (x, w, bias, res, [stride, stride], [1, 1], [1, 1], 1, relu)


CASES = {
    "conv_bn_relu": case_conv_bn_relu,
    "bn_relu_conv": case_bn_relu_conv,
    "bn_add_relu": case_bn_add_relu,
    "conv_bias_act": case_conv_bias_act,
}


def clone_args(args, dtype=None):
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            b = a.detach().clone()
            if dtype is not None and b.is_floating_point():
                b = b.to(dtype)
            out.append(b.requires_grad_(a.requires_grad))
        else:
            out.append(a)
    return out


def as_tuple(out):
    return out if isinstance(out, tuple) else (out,)
