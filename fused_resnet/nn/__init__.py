"""The module-level glue every fused model uses, between torch.nn modules and the
fused operators: autocast casts (autocast.py), the batch-norm tensors, running-stat
update and sync BN modules (batch_norm.py), BN folding for inference (folding.py), the
convolution glue (layers.py), the stem (stem.py) and the shortcut kinds with the
block's fused tail (shortcuts.py)."""
from .autocast import autocast_dtype, cast
from .batch_norm import (StatsUpdate, SyncBatchNorm2d, batch_norm, bn_tensors,
                         convert_sync_batchnorm,
                         is_fusable_bn, revert_sync_batchnorm, sync_key, update_running_stats)
from .folding import conv_bias_act, folded, use_folded
from .fusable import check_fusable, functorch_active, refuse_scripting
from .layers import bn_relu_conv, check_input, conv, conv_args
from .shortcuts import (SHORTCUT_OPTIONS, FusedTailShortcut, NoShortcut, OptionAShortcut,
                        block_tail, check_option, eval_shortcut, has_fused_tail, make_shortcut,
                        projection, set_shortcuts)
from .stem import stem

__all__ = ["autocast_dtype", "cast", "StatsUpdate", "SyncBatchNorm2d", "batch_norm", "bn_tensors",
           "convert_sync_batchnorm", "is_fusable_bn", "revert_sync_batchnorm", "sync_key",
           "update_running_stats", "conv_bias_act", "check_fusable", "functorch_active",
           "refuse_scripting", "folded", "use_folded",
           "bn_relu_conv", "check_input", "conv", "conv_args", "SHORTCUT_OPTIONS",
           "FusedTailShortcut", "NoShortcut", "OptionAShortcut", "block_tail", "check_option",
           "eval_shortcut", "has_fused_tail", "make_shortcut", "projection", "set_shortcuts",
           "stem"]
