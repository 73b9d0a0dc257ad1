"""The ReLU mask of BN -> ReLU -> conv's backward, applied in place without
materialising the activation y = relu(bn(z))."""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .conv import is_interpreter


@triton.jit
def _relu_mask_kernel(dy_ptr, z_ptr, scale_ptr, shift_ptr, numel, C, BLOCK: tl.constexpr):
    """dy[i] = 0 where (z[i]*scale[c] + shift[c]) rounded to z's dtype is <= 0 (as
    relu(bn(z)) <= 0, the mask autograd's ReLU uses; NaN passes its gradient), for
    channels_last-dense dy and z (channel = flat index % C)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < numel
    c = offs % C
    z = tl.load(z_ptr + offs, mask=m, other=0.0)
    sc = tl.load(scale_ptr + c, mask=m, other=1.0)
    sh = tl.load(shift_ptr + c, mask=m, other=0.0)
    t = (z.to(tl.float32) * sc + sh).to(z.dtype)
    dy = tl.load(dy_ptr + offs, mask=m, other=0.0)
    out = tl.where(t <= 0.0, 0.0, dy.to(tl.float32)).to(dy.dtype)
    tl.store(dy_ptr + offs, out, mask=m)


def relu_mask_(dy: torch.Tensor, z: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor):
    """In place: dy = 0 where relu(z*scale + shift) would be 0 (dy, z channels_last)."""
    cl = torch.channels_last
    if not (dy.is_contiguous(memory_format=cl) and z.is_contiguous(memory_format=cl)):
        raise ValueError("relu_mask_ expects channels_last dy and z")
    numel = dy.numel()
    if numel == 0:
        return dy
    block = 8192 if is_interpreter() else 1024
    grid = (triton.cdiv(numel, block),)
    ctx = torch.cuda.device(dy.device) if dy.device.type == "cuda" else contextlib.nullcontext()
    with ctx:
        _relu_mask_kernel[grid](dy, z, scale.float().contiguous(), shift.float().contiguous(),
                                numel, dy.shape[1], BLOCK=block)
    return dy
