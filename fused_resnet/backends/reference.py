"""The `reference` backend: the primitives in plain PyTorch (backends/primitives.py), on
any device. The oracle of the compiled backends, not their bar."""
from __future__ import annotations

from . import primitives
from .base import Backend


class ReferenceBackend(Backend):
    name = "reference"
    bn_stats = staticmethod(primitives.bn_stats)
    bn_apply = staticmethod(primitives.bn_apply)
    bn_backward_reduce = staticmethod(primitives.bn_backward_reduce)
    bn_backward_apply = staticmethod(primitives.bn_backward_apply)
    bn_apply_option_a = staticmethod(primitives.bn_apply_option_a)
    bn_backward_apply_option_a = staticmethod(primitives.bn_backward_apply_option_a)

    def unavailable_reason(self, device):
        return None
