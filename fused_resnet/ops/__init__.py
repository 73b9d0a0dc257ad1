"""The fused block operators: torch.library custom ops in the `fused_resnet`
namespace, each with a fake (meta) kernel and an autograd formula, one per file.

    conv_bn_relu          conv -> BN -> ReLU (the stem)               -> (out, z, mean, var)
    bn_relu_conv          BN -> ReLU -> conv (inside a block)         -> (out, mean, var)
    bn_add_relu           BN -> + shortcut -> ReLU (the block's tail)
                          -> (out, mean, var, mean_d, var_d); shortcut: an identity tensor,
                          or the projection's pre-BN output z_d and its BN
    bn_add_relu_option_a  BN -> + subsampled, zero-padded input -> ReLU (option-A shortcut)
    conv_bias_act         conv + bias (+ residual) (+ ReLU): eval mode with BN folded -> out
    update_running_stats  the running-statistics update of training-mode BN (mutating)

The ops are functional (PyTorch allows autograd formulas only on functional custom
ops), so they return the batch mean and biased variance, and the caller updates the
running buffers with `update_running_stats` - what fused_resnet.nn does.

Memory: what backward keeps is the pre-BN convolution outputs (z), the per-channel
statistics, and outputs that the network keeps alive anyway (a block's output is the
next block's input). BN -> ReLU -> conv is one operator so that the normalised
activation between them is never saved: backward recomputes it.

Sync BN (data-parallel training): conv_bn_relu, bn_relu_conv and bn_add_relu take an
optional trailing `sync_group` (a process-group key, "" = none); with it the batch
statistics and the backward's sums are merged over the ranks (one all-reduce each way)
and `var` carries the global count as an extra last element
(fused_resnet/backends/collectives.py).

Every op runs on the backend chosen by `fused_resnet.set_backend` (fused_resnet/backends);
the backend is fixed at forward time and reused by the backward. The compiled
primitives' fake kernels: compiled_fakes.py.
"""
from .args import BNArgs, ConvArgs
from .bn_add_relu import bn_add_relu
from .bn_add_relu_option_a import bn_add_relu_option_a
from .bn_relu_conv import bn_relu_conv
from .compiled_fakes import register_fake_kernels
from .conv_bias_act import conv_bias_act
from .conv_bn_relu import conv_bn_relu
from .update_running_stats import update_running_stats

register_fake_kernels()

__all__ = ["BNArgs", "ConvArgs", "bn_add_relu", "bn_add_relu_option_a", "bn_relu_conv",
           "conv_bias_act", "conv_bn_relu", "update_running_stats"]
