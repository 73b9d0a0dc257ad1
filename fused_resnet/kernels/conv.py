"""Implicit-GEMM 2-D convolutions in Triton, NHWC (channels_last), with the fusions of
DESIGN.md levels 2-4:

* ``conv2d``            forward.  PROLOGUE (level 3): the input tile is loaded as
                        ``relu?(x * in_scale[c] + in_shift[c])`` (zero padding stays zero
                        *after* the activation).  EPILOGUE: eval mode (level 4)
                        ``relu?(acc + bias[co] + residual)``; train mode (level 2)
                        per-output-channel fp32 batch mean / variance of the raw conv
                        output (per-tile count, mean, M2, merged by a second kernel).
* ``conv2d_input_grad`` data gradient (transposed conv as an implicit GEMM, split into
                        ``stride_h * stride_w`` sub-pixel phases so no MMA is spent on taps
                        that do not contribute).
* ``conv2d_weight_grad`` weight gradient (implicit GEMM with the reduction over the
                        N*Ho*Wo output positions, split-K across programs, fp32 atomics),
                        with the same prologue applied to ``x`` on load.

Both backward kernels optionally fold the batch-norm backward into their loads of
``grad_out`` (``bn_grad=`` argument, see ``BNGradPrologue``): the conv then consumes
``grad_z = a[c]*g + b[c]*(z - mean[c]) + d[c]`` with ``g = grad_out`` masked to 0 where
``out <= 0``, exactly ``fused_resnet.backends.primitives.bn_backward_apply``'s formula, without
ever materialising ``grad_z``.

GEMM views (per group ``g``; ``Cin_g = Cin/groups``, ``Cout_g = Cout/groups``):

==========  =================  ==============  =======================
kernel      M                  N               K (reduction)
==========  =================  ==============  =======================
forward     N*Ho*Wo (pixels)   Cout_g          KH*KW*Cin_g
dgrad       N*H*W / phases     Cin_g           (valid taps)*Cout_g
wgrad       Cout_g             KH*KW*Cin_g     N*Ho*Wo (split-K)
==========  =================  ==============  =======================

Weights are used as ``[Cout, KH, KW, Cin_g]`` contiguous (a free view when the weight
is already channels_last, otherwise one small copy per call; nothing is cached).
All accumulation is fp32; index math that can pass 2^31 (the batch offset) is int64,
the rest is int32, which is valid because a single image (H*W*C) must stay below 2^31
elements (checked).

Precision of fp32 inputs: the MMA uses TF32 when ``torch.backends.cudnn.allow_tf32`` is
True (as cuDNN does for ``F.conv2d``) and full IEEE fp32 otherwise.  The interpreter
always computes in fp32.

Written against Triton 3.6 .. 3.8 (``tl.dot(..., input_precision=)``, ``tl.reduce``,
``tl.atomic_add(..., sem=)``, ``triton.autotune``), and runs under ``TRITON_INTERPRET=1``
(fp32 / fp16; bf16 only on a GPU).
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch
import triton
import triton.language as tl

__all__ = [
    "conv2d",
    "conv2d_input_grad",
    "conv2d_weight_grad",
    "BNGradPrologue",
    "conv_output_size",
    "is_interpreter",
]

IntPair = Union[int, Sequence[int]]

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Channels per group below which the forward / wgrad kernels flatten (tap, channel) into
# one GEMM dimension instead of padding each tap's channel slice to a full BLOCK_K/N.
_FLAT_CHANNELS = 16
# Tiles of the statistics merge (_stats_merge_kernel): partial rows x channels.
_MERGE_BLOCK_T = 64
_MERGE_BLOCK_C = 32


def is_interpreter() -> bool:
    """Whether the kernels of this module run under the Triton interpreter: decided when
    the module was imported (``@triton.jit`` reads TRITON_INTERPRET at decoration)."""
    return _INTERPRET


_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


# --------------------------------------------------------------------------------------
# autotune configurations
# --------------------------------------------------------------------------------------

def _cfg(bm, bn, bk, warps, stages, group_m=8):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m},
                         num_warps=warps, num_stages=stages)


if is_interpreter():
    # One small config: autotuning under the interpreter would run every config on CPU.
    _FWD_CONFIGS = [_cfg(32, 16, 16, 4, 1)]
    _DGRAD_CONFIGS = [_cfg(32, 16, 16, 4, 1)]
    _WGRAD_CONFIGS = [_cfg(16, 16, 32, 4, 1)]
else:
    # Hopper-oriented (bf16/fp16 MMA; fp32 runs the same tiles).  Kept small: each shape
    # tunes once per process, the pruner below drops tiles far wider than the problem.
    _FWD_CONFIGS = [
        _cfg(128, 128, 64, 8, 3),
        _cfg(128, 256, 64, 8, 3),
        _cfg(256, 128, 64, 8, 3),
        _cfg(128, 64, 64, 4, 4),
        _cfg(64, 128, 64, 4, 4),
        _cfg(64, 64, 64, 4, 4),
        _cfg(128, 32, 32, 4, 4),
        _cfg(128, 16, 32, 4, 4),
    ]
    _DGRAD_CONFIGS = list(_FWD_CONFIGS)
    _WGRAD_CONFIGS = [
        _cfg(128, 128, 64, 8, 3),
        _cfg(128, 64, 64, 4, 4),
        _cfg(64, 128, 64, 4, 4),
        _cfg(64, 64, 64, 4, 4),
        _cfg(32, 64, 64, 4, 4),
        _cfg(16, 64, 64, 4, 4),
        _cfg(64, 16, 64, 4, 4),
    ]


def _pow2_at_least_16(v: int) -> int:
    return max(16, triton.next_power_of_2(max(int(v), 1)))


_SMEM_BUDGET = 200 * 1024   # below Hopper's 227 KB per block, leaving room for extras


def _prune(configs, named_args, kwargs, dims, tensor_arg, extra_loads):
    """Keep tiles no wider than the (power-of-two rounded) problem along each named dim
    whose estimated pipelined shared memory fits (fp32 operands take twice bf16's; fused
    loads that pass through registers cost roughly half as much again)."""
    esize = named_args[tensor_arg].element_size()
    factor = 1.5 if any(named_args.get(k, kwargs.get(k, False)) for k in extra_loads) else 1.0

    def smem(c):
        b = c.kwargs
        return c.num_stages * (b["BLOCK_M"] * b["BLOCK_K"] + b["BLOCK_K"] * b["BLOCK_N"]) \
            * esize * factor

    def width(c):
        return sum(c.kwargs[b] for b, _ in dims)

    keep = [c for c in configs
            if all(c.kwargs[b] <= _pow2_at_least_16(named_args[a]) for b, a in dims)
            and smem(c) <= _SMEM_BUDGET]
    if not keep:  # nothing fits: the narrowest, then smallest, tile
        keep = [min(configs, key=lambda c: (width(c), smem(c)))]
    return keep


def _prune_fwd(configs, named_args, **kwargs):
    kdim = "KTOT" if named_args.get("FLAT_K", kwargs.get("FLAT_K", False)) else "CIN_G"
    return _prune(configs, named_args, kwargs, [("BLOCK_N", "COUT_G"), ("BLOCK_K", kdim)],
                  "x_ptr", ("HAS_PROLOGUE",))


def _prune_dgrad(configs, named_args, **kwargs):
    return _prune(configs, named_args, kwargs, [("BLOCK_N", "CIN_G"), ("BLOCK_K", "COUT_G")],
                  "go_ptr", ("BN_GRAD",))


def _prune_wgrad(configs, named_args, **kwargs):
    ndim = "KTOT" if named_args.get("FLAT_N", kwargs.get("FLAT_N", False)) else "CIN_G"
    return _prune(configs, named_args, kwargs, [("BLOCK_M", "COUT_G"), ("BLOCK_N", ndim)],
                  "x_ptr", ("HAS_PROLOGUE", "BN_GRAD"))


# --------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------

# Only builtins and the jit helpers below are used inside the kernels (no tl.cdiv /
# tl.sum / tl.zeros, which are themselves @jit functions of triton.language): then the
# kernels run under the interpreter whenever THIS module is imported with
# TRITON_INTERPRET=1, even if triton itself was imported earlier without it.

@triton.jit
def _cdiv(a, b):
    return (a + b - 1) // b


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _swizzle(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Grouped tile order: GROUP_M M-tiles share their weight (N) tiles in L2."""
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _in_prologue(a, mask, scale, shift, IN_RELU: tl.constexpr):
    """relu?(a * scale + shift) in fp32 (scale/shift broadcast along the channel axis of
    the tile by the caller), forced to 0 outside `mask` (padding stays zero AFTER the
    activation), cast back to the tile's dtype for the MMA."""
    af = a.to(tl.float32) * scale + shift
    if IN_RELU:
        af = tl.maximum(af, 0.0)
    return tl.where(mask, af, 0.0).to(a.dtype)


@triton.jit
def _bn_grad_prologue(gy, mask, out_ptrs, z_ptrs, mean, ca, cb, cd, RELU_MASK: tl.constexpr):
    """grad_z = a*g + b*(z - mean) + d with g = gy, zeroed where out <= 0 when RELU_MASK
    (a NaN output passes its gradient, as primitives.bn_backward_apply), 0 outside `mask`."""
    z = tl.load(z_ptrs, mask=mask, other=0.0).to(tl.float32)
    g = gy.to(tl.float32)
    if RELU_MASK:
        o = tl.load(out_ptrs, mask=mask, other=0.0).to(tl.float32)
        g = tl.where(o <= 0.0, 0.0, g)
    gz = ca * g + cb * (z - mean) + cd
    return tl.where(mask, gz, 0.0).to(gy.dtype)


@triton.autotune(configs=_FWD_CONFIGS,
                 key=["M", "COUT_G", "CIN_G", "KTOT", "H", "W"],
                 prune_configs_by={"early_config_prune": _prune_fwd},
                 reset_to_zero=["part_ptr"])
@triton.jit
def _conv_fwd_kernel(
    x_ptr, w_ptr, out_ptr,
    scale_ptr, shift_ptr, bias_ptr, res_ptr, part_ptr, PART_ROWS, COUT,
    H, W, Ho, Wo, CIN_G, COUT_G, M, KTOT,
    sxn, sxh, sxw, son, soh, sow, srn, srh, srw,
    STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
    KH: tl.constexpr, KW: tl.constexpr,
    HAS_PROLOGUE: tl.constexpr, IN_RELU: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, OUT_RELU: tl.constexpr,
    STATS: tl.constexpr, FLAT_K: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    g = tl.program_id(1)
    pid_m, pid_n = _swizzle(pid, _cdiv(M, BLOCK_M), _cdiv(COUT_G, BLOCK_N), GROUP_M)

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_mask = rm < M
    n_mask = rn < COUT_G

    hwo = Ho * Wo
    n_img = rm // hwo
    rem = rm - n_img * hwo
    oh = rem // Wo
    ow = rem - oh * Wo
    ih0 = oh * STRIDE_H - PAD_H
    iw0 = ow * STRIDE_W - PAD_W
    n64 = n_img.to(tl.int64)
    x_img = x_ptr + n64 * sxn                      # [BM] pointers, int64 batch offset
    cin0 = g * CIN_G
    co = g * COUT_G + rn
    w_rows = w_ptr + co * KTOT                     # [BN] rows of [Cout, KH, KW, Cin_g]

    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    if FLAT_K:
        # K = (kh, kw, ci) flattened: small Cin_g (the RGB stem, depthwise-ish groups).
        for k0 in range(0, KTOT, BLOCK_K):
            kk = k0 + rk
            k_mask = kk < KTOT
            tap = kk // CIN_G
            ci = kk - tap * CIN_G
            kh = tap // KW
            kw = tap - kh * KW
            ih = ih0[:, None] + (kh * DIL_H)[None, :]
            iw = iw0[:, None] + (kw * DIL_W)[None, :]
            a_mask = (m_mask[:, None] & k_mask[None, :] & (ih >= 0) & (ih < H)
                      & (iw >= 0) & (iw < W))
            a = tl.load(x_img[:, None] + (ih * sxh + iw * sxw + (cin0 + ci)[None, :]),
                        mask=a_mask, other=0.0)
            if HAS_PROLOGUE:
                sc = tl.load(scale_ptr + cin0 + ci, mask=k_mask, other=1.0)
                sh = tl.load(shift_ptr + cin0 + ci, mask=k_mask, other=0.0)
                a = _in_prologue(a, a_mask, sc[None, :], sh[None, :], IN_RELU)
            b = tl.load(w_rows[None, :] + kk[:, None],
                        mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
    else:
        # K loop over (tap, channel chunk), flattened into one loop so it pipelines.
        c_iters = _cdiv(CIN_G, BLOCK_K)
        for it in range(0, KH * KW * c_iters):
            tap = it // c_iters
            c0 = (it - tap * c_iters) * BLOCK_K
            kh = tap // KW
            kw = tap - kh * KW
            ih = ih0 + kh * DIL_H
            iw = iw0 + kw * DIL_W
            r_mask = m_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            ci = c0 + rk
            k_mask = ci < CIN_G
            a_mask = r_mask[:, None] & k_mask[None, :]
            a = tl.load((x_img + (ih * sxh + iw * sxw))[:, None] + (cin0 + ci)[None, :],
                        mask=a_mask, other=0.0)
            if HAS_PROLOGUE:
                sc = tl.load(scale_ptr + cin0 + ci, mask=k_mask, other=1.0)
                sh = tl.load(shift_ptr + cin0 + ci, mask=k_mask, other=0.0)
                a = _in_prologue(a, a_mask, sc[None, :], sh[None, :], IN_RELU)
            b = tl.load(w_rows[None, :] + (tap * CIN_G + ci)[:, None],
                        mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=DOT_PREC)

    # ---- epilogue ----
    if STATS:
        # This tile's (count, mean, M2) per channel, centred on the tile's own mean (no
        # E[z^2] - E[z]^2 cancellation), into row pid_m of the [3, PART_ROWS, COUT]
        # partials; _stats_merge_kernel merges the rows in a fixed order (deterministic,
        # no atomics). Rows >= M of acc are 0 (masked loads): the sum needs no mask.
        cnt = tl.sum(m_mask.to(tl.float32), 0)
        t_mean = tl.reduce(acc, 0, _add) / cnt
        dev = tl.where(m_mask[:, None], acc - t_mean[None, :], 0.0)
        t_m2 = tl.reduce(dev * dev, 0, _add)
        prow = part_ptr + pid_m.to(tl.int64) * COUT + co
        plane = PART_ROWS.to(tl.int64) * COUT
        tl.store(prow, tl.zeros_like(t_mean) + cnt, mask=n_mask)
        tl.store(prow + plane, t_mean, mask=n_mask)
        tl.store(prow + 2 * plane, t_m2, mask=n_mask)
    o_mask = m_mask[:, None] & n_mask[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + co, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_RES:
        r_rows = res_ptr + n64 * srn + (oh * srh + ow * srw)
        acc += tl.load(r_rows[:, None] + co[None, :], mask=o_mask, other=0.0).to(tl.float32)
    if OUT_RELU:
        acc = tl.maximum(acc, 0.0)
    o_rows = out_ptr + n64 * son + (oh * soh + ow * sow)
    tl.store(o_rows[:, None] + co[None, :], acc.to(out_ptr.dtype.element_ty), mask=o_mask)


@triton.autotune(configs=_DGRAD_CONFIGS,
                 key=["M", "CIN_G", "COUT_G", "NKH", "NKW", "Ho", "Wo"],
                 prune_configs_by={"early_config_prune": _prune_dgrad})
@triton.jit
def _conv_dgrad_kernel(
    go_ptr, w_ptr, gi_ptr,
    bo_ptr, bz_ptr, bmean_ptr, ba_ptr, bb_ptr, bd_ptr,
    Ho, Wo, HP, WP, CIN_G, COUT_G, M, KTOT,
    sgn, sgh, sgw, sin_, sih, siw,
    PH, PW, STRIDE_H, STRIDE_W,
    KH0, KW0, KH_STEP, KW_STEP, NKH, NKW, Q0H, Q0W, DQH, DQW,
    KW: tl.constexpr, BN_GRAD: tl.constexpr, BN_RELU: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """grad_in[n, ih, iw, ci] = sum_{co, kh, kw} grad_out[n, oh, ow, co] * w[co, kh, kw, ci]
    with ih = oh*s - p + kh*d, for the input pixels of ONE sub-pixel phase
    (ih = PH + s*i, iw = PW + s*j).  In a phase the contributing taps are the arithmetic
    progression kh = KH0 + a*KH_STEP (a < NKH) and then oh = i + Q0H - a*DQH exactly
    (host-computed), so no MMA is spent on non-contributing taps."""
    pid = tl.program_id(0)
    g = tl.program_id(1)
    pid_m, pid_n = _swizzle(pid, _cdiv(M, BLOCK_M), _cdiv(CIN_G, BLOCK_N), GROUP_M)

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_mask = rm < M
    n_mask = rn < CIN_G

    hwp = HP * WP
    n_img = rm // hwp
    rem = rm - n_img * hwp
    i = rem // WP
    j = rem - i * WP
    n64 = n_img.to(tl.int64)
    go_img = go_ptr + n64 * sgn
    cout0 = g * COUT_G
    if BN_GRAD:
        bo_img = bo_ptr + n64 * sgn
        bz_img = bz_ptr + n64 * sgn

    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    c_iters = _cdiv(COUT_G, BLOCK_K)
    for it in range(0, NKH * NKW * c_iters):
        t = it // c_iters
        c0 = (it - t * c_iters) * BLOCK_K
        ta = t // NKW
        tb = t - ta * NKW
        kh = KH0 + ta * KH_STEP
        kw = KW0 + tb * KW_STEP
        oh = i + (Q0H - ta * DQH)
        ow = j + (Q0W - tb * DQW)
        r_mask = m_mask & (oh >= 0) & (oh < Ho) & (ow >= 0) & (ow < Wo)
        co = c0 + rk
        k_mask = co < COUT_G
        a_mask = r_mask[:, None] & k_mask[None, :]
        a_off = (oh * sgh + ow * sgw)[:, None] + (cout0 + co)[None, :]
        a = tl.load(go_img[:, None] + a_off, mask=a_mask, other=0.0)
        if BN_GRAD:
            cm = tl.load(bmean_ptr + cout0 + co, mask=k_mask, other=0.0)
            ca = tl.load(ba_ptr + cout0 + co, mask=k_mask, other=0.0)
            cb = tl.load(bb_ptr + cout0 + co, mask=k_mask, other=0.0)
            cd = tl.load(bd_ptr + cout0 + co, mask=k_mask, other=0.0)
            a = _bn_grad_prologue(a, a_mask, bo_img[:, None] + a_off, bz_img[:, None] + a_off,
                                  cm[None, :], ca[None, :], cb[None, :], cd[None, :],
                                  BN_RELU)
        b = tl.load(w_ptr + (cout0 + co)[:, None] * KTOT + ((kh * KW + kw) * CIN_G + rn)[None, :],
                    mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PREC)

    ih = PH + i * STRIDE_H
    iw = PW + j * STRIDE_W
    gi_rows = gi_ptr + n64 * sin_ + (ih * sih + iw * siw)
    tl.store(gi_rows[:, None] + (g * CIN_G + rn)[None, :], acc.to(gi_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


@triton.autotune(configs=_WGRAD_CONFIGS,
                 key=["COUT_G", "CIN_G", "KTOT", "P", "SPLIT"],
                 prune_configs_by={"early_config_prune": _prune_wgrad},
                 reset_to_zero=["gw_ptr"])
@triton.jit
def _conv_wgrad_kernel(
    x_ptr, go_ptr, gw_ptr, scale_ptr, shift_ptr,
    bo_ptr, bz_ptr, bmean_ptr, ba_ptr, bb_ptr, bd_ptr,
    H, W, Ho, Wo, CIN_G, COUT_G, P, KTOT, P_PER_SPLIT, SPLIT,
    sxn, sxh, sxw, sgn, sgh, sgw,
    STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
    KH: tl.constexpr, KW: tl.constexpr,
    HAS_PROLOGUE: tl.constexpr, IN_RELU: tl.constexpr, BN_GRAD: tl.constexpr,
    BN_RELU: tl.constexpr, FLAT_N: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """gw[co, kh, kw, ci] += sum_{p in this split} grad_out[p, co] * x'[p shifted by tap, ci]
    (fp32 atomics into a zeroed buffer).  Grid: (M-tiles * N-tiles, taps, groups*SPLIT);
    with FLAT_N the N dim is (kh, kw, ci) flattened and axis 1 has size 1."""
    pid = tl.program_id(0)
    tap_id = tl.program_id(1)
    pid2 = tl.program_id(2)
    g = pid2 // SPLIT
    s = pid2 - g * SPLIT
    if FLAT_N:
        NN = KTOT
    else:
        NN = CIN_G
    num_pid_n = _cdiv(NN, BLOCK_N)
    pid_m = pid // num_pid_n
    pid_n = pid - pid_m * num_pid_n

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_mask = rm < COUT_G
    n_mask = rn < NN
    co = g * COUT_G + rm
    if FLAT_N:
        tap = rn // CIN_G
        ci = rn - tap * CIN_G
        kh = tap // KW
        kw = tap - kh * KW
        col = rn
    else:
        kh = tap_id // KW
        kw = tap_id - kh * KW
        ci = rn
        col = tap_id * CIN_G + rn
    cin = g * CIN_G + ci
    if HAS_PROLOGUE:
        sc = tl.load(scale_ptr + cin, mask=n_mask, other=1.0)[None, :]
        sh = tl.load(shift_ptr + cin, mask=n_mask, other=0.0)[None, :]
    if BN_GRAD:
        cm = tl.load(bmean_ptr + co, mask=m_mask, other=0.0)[:, None]
        ca = tl.load(ba_ptr + co, mask=m_mask, other=0.0)[:, None]
        cb = tl.load(bb_ptr + co, mask=m_mask, other=0.0)[:, None]
        cd = tl.load(bd_ptr + co, mask=m_mask, other=0.0)[:, None]

    hwo = Ho * Wo
    p_start = s * P_PER_SPLIT
    p_end = tl.minimum(P, p_start + P_PER_SPLIT)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for p0 in range(p_start, p_end, BLOCK_K):
        rp = p0 + rk
        p_mask = rp < p_end
        n_img = rp // hwo
        rem = rp - n_img * hwo
        oh = rem // Wo
        ow = rem - oh * Wo
        n64 = n_img.to(tl.int64)
        # A = grad_out^T tile [BM (co), BK (positions)], contiguous along co.
        a_mask = m_mask[:, None] & p_mask[None, :]
        a_off = (n64 * sgn + (oh * sgh + ow * sgw))[None, :] + co[:, None]
        a = tl.load(go_ptr + a_off, mask=a_mask, other=0.0)
        if BN_GRAD:
            a = _bn_grad_prologue(a, a_mask, bo_ptr + a_off, bz_ptr + a_off, cm, ca, cb, cd,
                                  BN_RELU)
        # B = x' tile [BK (positions), BN (tap, ci)], contiguous along ci.
        if FLAT_N:
            ih = (oh * STRIDE_H - PAD_H)[:, None] + (kh * DIL_H)[None, :]
            iw = (ow * STRIDE_W - PAD_W)[:, None] + (kw * DIL_W)[None, :]
            b_mask = (p_mask[:, None] & n_mask[None, :] & (ih >= 0) & (ih < H)
                      & (iw >= 0) & (iw < W))
            b_ptrs = (x_ptr + n64 * sxn)[:, None] + (ih * sxh + iw * sxw + cin[None, :])
        else:
            ih = oh * STRIDE_H - PAD_H + kh * DIL_H
            iw = ow * STRIDE_W - PAD_W + kw * DIL_W
            r_mask = p_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            b_mask = r_mask[:, None] & n_mask[None, :]
            b_ptrs = (x_ptr + n64 * sxn + (ih * sxh + iw * sxw))[:, None] + cin[None, :]
        b = tl.load(b_ptrs, mask=b_mask, other=0.0)
        if HAS_PROLOGUE:
            b = _in_prologue(b, b_mask, sc, sh, IN_RELU)
        acc = tl.dot(a, b, acc, input_precision=DOT_PREC)

    gw_ptrs = gw_ptr + co[:, None] * KTOT + col[None, :]
    tl.atomic_add(gw_ptrs, acc, mask=m_mask[:, None] & n_mask[None, :], sem="relaxed")


# --------------------------------------------------------------------------------------
# Python boundary: validation and launch
# --------------------------------------------------------------------------------------

def _pair(v, name: str, minimum: int) -> Tuple[int, int]:
    if isinstance(v, bool):
        raise TypeError(f"{name} must be an int or a pair of ints, got a bool")
    if isinstance(v, int):
        t = (v, v)
    elif isinstance(v, (tuple, list, torch.Size)) and len(v) in (1, 2):
        t = tuple(v) * (2 // len(v))
        if not all(isinstance(e, int) and not isinstance(e, bool) for e in t):
            raise TypeError(f"{name} must be an int or a pair of ints, got {v!r}")
    else:
        raise TypeError(f"{name} must be an int or a pair of ints, got {v!r}")
    if min(t) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v!r}")
    return int(t[0]), int(t[1])


def conv_output_size(size: int, k: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (k - 1) - 1) // stride + 1


def _check_device(t: torch.Tensor, name: str) -> None:
    if t.device.type != "cuda" and not is_interpreter():
        raise ValueError(
            f"{name} is on {t.device}: the Triton conv kernels need CUDA tensors "
            "(or TRITON_INTERPRET=1 set before this module is imported, for the CPU "
            "interpreter)")


def _check_act(t, name: str, dtype: Optional[torch.dtype] = None,
               device: Optional[torch.device] = None) -> torch.Tensor:
    """A 4-D activation [N, C, H, W]; returned channels_last-contiguous (a no-op when it
    already is, otherwise one conversion copy)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name} must be 4-D [N, C, H, W] (channels_last in memory), "
                         f"got {t.dim()}-D shape {tuple(t.shape)}")
    if dtype is None:
        if t.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
    elif t.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype} (same as the conv input), got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} (same as the conv input)")
    _check_device(t, name)
    if t.dtype == torch.bfloat16 and is_interpreter():
        raise TypeError(f"{name} is bfloat16, which the Triton interpreter computes wrongly: "
                        "use float16/float32 under TRITON_INTERPRET=1 (bfloat16 needs a GPU)")
    if t.shape[1] * t.shape[2] * t.shape[3] >= 2 ** 31:
        raise ValueError(f"{name}: one image has C*H*W = {t.shape[1] * t.shape[2] * t.shape[3]} "
                         "elements; the kernels index within an image in int32 (< 2^31)")
    return t.contiguous(memory_format=torch.channels_last)


def _check_vec(v, name: str, length: int, device: torch.device) -> torch.Tensor:
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(v).__name__}")
    if v.dim() != 1 or v.numel() != length:
        raise ValueError(f"{name} must be a 1-D vector of {length} per-channel values, "
                         f"got shape {tuple(v.shape)}")
    if not v.is_floating_point():
        raise TypeError(f"{name} must be floating point (used as fp32), got {v.dtype}")
    if v.device != device:
        raise ValueError(f"{name} is on {v.device}, expected {device} (same as the conv input)")
    return v.to(torch.float32).contiguous()


def _check_weight_dims(weight_shape, cin: int, groups: int, name: str = "weight"):
    if len(weight_shape) != 4:
        raise ValueError(f"{name} must be 4-D [Cout, Cin/groups, KH, KW], got shape "
                         f"{tuple(weight_shape)}")
    cout, cin_g, kh, kw = (int(s) for s in weight_shape)
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    if cin % groups != 0:
        raise ValueError(f"input channels ({cin}) must be divisible by groups ({groups})")
    if cout % groups != 0:
        raise ValueError(f"{name} output channels ({cout}) must be divisible by groups ({groups})")
    if cin_g * groups != cin:
        raise ValueError(f"{name} has {cin_g} input channels per group, but the input has "
                         f"{cin} channels and groups={groups}: expected {name}.shape[1] == "
                         f"{cin // groups}")
    if min(cout, cin_g, kh, kw) < 1:
        raise ValueError(f"{name} has an empty dimension: shape {tuple(weight_shape)}")
    return cout, cin_g, kh, kw


def _check_weight(weight, x: torch.Tensor, groups: int) -> torch.Tensor:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must match the input dtype {x.dtype}")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device}, expected {x.device} (same as the input)")
    _check_weight_dims(weight.shape, x.shape[1], groups)
    return weight


def _weight_khwc(weight: torch.Tensor) -> torch.Tensor:
    """[Cout, Cin_g, KH, KW] (any layout) -> [Cout, KH, KW, Cin_g] contiguous."""
    return weight.permute(0, 2, 3, 1).contiguous()


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cudnn.allow_tf32:
        return "ieee"
    return "tf32"   # Triton's default; only meaningful for fp32 operands


def _dummy(device) -> torch.Tensor:
    return torch.zeros(1, dtype=torch.float32, device=device)


def _out_hw(H, W, kh, kw, stride, padding, dilation, what: str):
    Ho = conv_output_size(H, kh, stride[0], padding[0], dilation[0])
    Wo = conv_output_size(W, kw, stride[1], padding[1], dilation[1])
    if Ho < 1 or Wo < 1:
        raise ValueError(f"{what}: input {H}x{W} is too small for kernel {kh}x{kw} with "
                         f"stride {stride}, padding {padding}, dilation {dilation} "
                         f"(output would be {Ho}x{Wo})")
    return Ho, Wo


def _check_rows(rows: int, what: str) -> None:
    if rows >= 2 ** 31:
        raise ValueError(f"{what} = {rows} GEMM rows (N*H*W positions) must stay below 2^31; "
                         "split the batch")


def _on(device: torch.device):
    """Launch on the tensors' GPU (Triton launches on the current device and stream)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _launch_accumulating(kernel, grid, zero_bufs, *args, **kwargs):
    """Launch a kernel that accumulates into `zero_bufs` (atomics).  The autotuner zeroes
    them around its benchmark runs (reset_to_zero); to not depend on whether a given
    Triton version also zeroes them before the final run, rerun from zero whenever this
    call triggered tuning (once per shape)."""
    cache = getattr(kernel, "cache", None)
    before = len(cache) if isinstance(cache, dict) else None
    for b in zero_bufs:
        b.zero_()
    kernel[grid](*args, **kwargs)
    if before is not None and len(kernel.cache) != before:
        for b in zero_bufs:
            b.zero_()
        kernel[grid](*args, **kwargs)


@triton.jit
def _stats_merge_kernel(part_ptr, mean_ptr, var_ptr, PART_ROWS, C,
                        BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """mean and biased variance per channel from the conv epilogue's per-tile
    (count, mean, M2) partials [3, PART_ROWS, C] (rows of count 0: unused). Each chunk of
    BLOCK_T rows is combined exactly (mean of the means weighted by count; M2 plus the
    spread of the tile means around it), then merged into the running result (Chan), in
    a fixed order."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    rt = tl.arange(0, BLOCK_T)
    plane = PART_ROWS.to(tl.int64) * C
    n = tl.zeros((BLOCK_C,), tl.float32)
    mean = tl.zeros((BLOCK_C,), tl.float32)
    m2 = tl.zeros((BLOCK_C,), tl.float32)
    for t0 in range(0, PART_ROWS, BLOCK_T):
        t = t0 + rt
        mask = (t < PART_ROWS)[:, None] & c_mask[None, :]
        off = t.to(tl.int64)[:, None] * C + c[None, :]
        nb = tl.load(part_ptr + off, mask=mask, other=0.0)
        mb = tl.load(part_ptr + plane + off, mask=mask, other=0.0)
        m2b = tl.load(part_ptr + 2 * plane + off, mask=mask, other=0.0)
        cn = tl.sum(nb, 0)
        cmean = tl.sum(nb * mb, 0) / tl.where(cn > 0, cn, 1.0)
        spread = tl.where(nb > 0, mb - cmean[None, :], 0.0)
        cm2 = tl.sum(m2b + nb * spread * spread, 0)
        tot = n + cn
        safe = tl.where(tot > 0, tot, 1.0)
        delta = cmean - mean
        mean = mean + delta * (cn / safe)
        m2 = m2 + cm2 + delta * delta * (n * cn / safe)
        n = tot
    tl.store(mean_ptr + c, mean, mask=c_mask)
    tl.store(var_ptr + c, m2 / tl.where(n > 0, n, 1.0), mask=c_mask)


def _epilogue_partial_rows(M: int) -> int:
    """Rows of the statistics partials: one per M-tile of the smallest tile any config
    may choose (a larger tile leaves rows at count 0)."""
    return triton.cdiv(M, min(c.kwargs["BLOCK_M"] for c in _FWD_CONFIGS))


@dataclass
class BNGradPrologue:
    """Batch-norm(+ReLU) backward folded into a backward conv's load of ``grad_out``.

    For a block ``out = relu?(bn(z) [+ ...])`` whose ``z`` is this conv's output, the
    conv's true incoming gradient is, per output channel c,

        grad_z = a[c] * g + b[c] * (z - mean[c]) + d[c],   g = grad_out, 0 where out <= 0

    (``fused_resnet.primitives.bn_backward_apply``'s math; ``a, b, d`` come from
    ``bn_backward_reduce``'s sums).  Passing this object to ``conv2d_input_grad`` /
    ``conv2d_weight_grad`` makes them consume ``grad_z`` computed on the fly from
    ``grad_out`` (the gradient w.r.t. ``out``), so ``grad_z`` never touches memory.

    Fields: ``z`` the saved pre-BN conv output and ``out`` the block output used for the
    ReLU mask (``None``: no ReLU mask), both the shape/dtype/device of ``grad_out``;
    ``mean, a, b, d`` 1-D per-output-channel vectors (used as fp32).
    """
    z: torch.Tensor
    out: Optional[torch.Tensor]
    mean: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    d: torch.Tensor


def _check_bn_grad(bg, grad_out: torch.Tensor):
    if bg is None:
        return None
    if not isinstance(bg, BNGradPrologue):
        raise TypeError(f"bn_grad must be a BNGradPrologue, got {type(bg).__name__}")
    z = _check_act(bg.z, "bn_grad.z", grad_out.dtype, grad_out.device)
    if z.shape != grad_out.shape:
        raise ValueError(f"bn_grad.z has shape {tuple(z.shape)}, expected grad_out's "
                         f"{tuple(grad_out.shape)}")
    out = None
    if bg.out is not None:
        out = _check_act(bg.out, "bn_grad.out", grad_out.dtype, grad_out.device)
        if out.shape != grad_out.shape:
            raise ValueError(f"bn_grad.out has shape {tuple(out.shape)}, expected grad_out's "
                             f"{tuple(grad_out.shape)}")
    C = grad_out.shape[1]
    vecs = [_check_vec(getattr(bg, f), f"bn_grad.{f}", C, grad_out.device)
            for f in ("mean", "a", "b", "d")]
    # the kernels index z / out with grad_out's strides (they can differ only in the
    # strides of size-1 dims): make them match
    if z.stride() != grad_out.stride():
        z = torch.empty_like(grad_out).copy_(z)
    if out is not None and out.stride() != grad_out.stride():
        out = torch.empty_like(grad_out).copy_(out)
    return z, out, vecs


# ---- forward -------------------------------------------------------------------------

def conv2d(x: torch.Tensor, weight: torch.Tensor, stride: IntPair = 1, padding: IntPair = 0,
           dilation: IntPair = 1, groups: int = 1, *,
           in_scale: Optional[torch.Tensor] = None, in_shift: Optional[torch.Tensor] = None,
           in_relu: bool = False,
           bias: Optional[torch.Tensor] = None, residual: Optional[torch.Tensor] = None,
           out_relu: bool = False, stats: bool = False):
    """NHWC implicit-GEMM conv2d with fused prologue / epilogue.

    x: [N, Cin, H, W] fp16/bf16/fp32 (channels_last; converted if not).  weight:
    [Cout, Cin/groups, KH, KW], same dtype, any layout.  The conv reads
    ``x' = relu?(x * in_scale[c] + in_shift[c])`` (missing scale = 1, shift = 0; padded
    taps contribute 0).  Output ``relu?(conv(x') + bias[co] + residual)`` in x's dtype,
    channels_last.  With ``stats=True`` also returns the fp32 per-output-channel batch
    ``mean`` and biased ``var`` of the raw conv output (before bias / residual / relu),
    from the fp32 accumulator: per-tile (count, mean, M2) partials merged by a second
    small kernel (no cancellation, deterministic, nothing read back to the host):
    ``(out, mean, var)``; zeros for an empty batch.
    """
    x = _check_act(x, "x")
    weight = _check_weight(weight, x, groups)
    stride = _pair(stride, "stride", 1)
    padding = _pair(padding, "padding", 0)
    dilation = _pair(dilation, "dilation", 1)
    N, Cin, H, W = x.shape
    Cout, cin_g, KH, KW = weight.shape
    cout_g = Cout // groups
    Ho, Wo = _out_hw(H, W, KH, KW, stride, padding, dilation, "conv2d")
    dev = x.device

    has_pro = in_scale is not None or in_shift is not None or bool(in_relu)
    if has_pro:
        scale = (_check_vec(in_scale, "in_scale", Cin, dev) if in_scale is not None
                 else torch.ones(Cin, dtype=torch.float32, device=dev))
        shift = (_check_vec(in_shift, "in_shift", Cin, dev) if in_shift is not None
                 else torch.zeros(Cin, dtype=torch.float32, device=dev))
    if bias is not None:
        bias = _check_vec(bias, "bias", Cout, dev)
    if residual is not None:
        residual = _check_act(residual, "residual", x.dtype, dev)
        if tuple(residual.shape) != (N, Cout, Ho, Wo):
            raise ValueError(f"residual must have the output shape {(N, Cout, Ho, Wo)}, "
                             f"got {tuple(residual.shape)}")

    out = torch.empty((N, Cout, Ho, Wo), dtype=x.dtype, device=dev,
                      memory_format=torch.channels_last)
    M = N * Ho * Wo
    _check_rows(M, "conv2d: N*Ho*Wo")
    if stats:
        mean = torch.empty(Cout, dtype=torch.float32, device=dev)
        var = torch.empty(Cout, dtype=torch.float32, device=dev)
        part_rows = _epilogue_partial_rows(M)
        parts = torch.empty((3, part_rows, Cout), dtype=torch.float32, device=dev)
    if M == 0:
        if stats:
            return out, mean.zero_(), var.zero_()
        return out

    w = _weight_khwc(weight)
    dummy = _dummy(dev)
    KTOT = KH * KW * cin_g
    flat_k = cin_g < _FLAT_CHANNELS
    res = residual if residual is not None else out
    sx, so, sr = x.stride(), out.stride(), res.stride()

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(cout_g, meta["BLOCK_N"]), groups)

    args = (x, w, out,
            scale if has_pro else dummy, shift if has_pro else dummy,
            bias if bias is not None else dummy, res,
            parts if stats else dummy, part_rows if stats else 0, Cout,
            H, W, Ho, Wo, cin_g, cout_g, M, KTOT,
            sx[0], sx[2], sx[3], so[0], so[2], so[3], sr[0], sr[2], sr[3],
            stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1])
    meta = dict(KH=KH, KW=KW, HAS_PROLOGUE=has_pro, IN_RELU=bool(in_relu),
                HAS_BIAS=bias is not None, HAS_RES=residual is not None,
                OUT_RELU=bool(out_relu), STATS=bool(stats), FLAT_K=flat_k,
                DOT_PREC=_dot_precision(x.dtype))
    with _on(dev):
        if stats:
            # zeroed: the rows a larger tile leaves unused must read as count 0
            _launch_accumulating(_conv_fwd_kernel, grid, [parts], *args, **meta)
            _stats_merge_kernel[(triton.cdiv(Cout, _MERGE_BLOCK_C),)](
                parts, mean, var, part_rows, Cout, BLOCK_T=_MERGE_BLOCK_T,
                BLOCK_C=_MERGE_BLOCK_C)
            return out, mean, var
        _conv_fwd_kernel[grid](*args, **meta)
    return out


# ---- data gradient -------------------------------------------------------------------

def _phase_taps(phase: int, pad: int, stride: int, dil: int, k: int):
    """Taps kh in [0, k) with (phase + pad - kh*dil) divisible by stride: an arithmetic
    progression kh0 + a*step; returns (kh0, step, count, q0, dq) with
    oh = i + q0 - a*dq for input row ih = phase + stride*i."""
    taps = [kh for kh in range(k) if (phase + pad - kh * dil) % stride == 0]
    if not taps:
        return 0, 1, 0, 0, 0
    step = stride // math.gcd(stride, dil)
    kh0 = taps[0]
    assert taps == list(range(kh0, k, step)), (taps, kh0, step)
    q0 = (phase + pad - kh0 * dil) // stride
    dq = (step * dil) // stride
    return kh0, step, len(taps), q0, dq


def conv2d_input_grad(grad_out: torch.Tensor, weight: torch.Tensor, input_shape,
                      stride: IntPair = 1, padding: IntPair = 0, dilation: IntPair = 1,
                      groups: int = 1, *, bn_grad: Optional[BNGradPrologue] = None
                      ) -> torch.Tensor:
    """grad_input [N, Cin, H, W] (channels_last, grad_out's dtype) of a conv2d with the
    given geometry.  ``bn_grad``: optional BNGradPrologue folded into the grad_out loads."""
    grad_out = _check_act(grad_out, "grad_out")
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dtype != grad_out.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must match grad_out's dtype {grad_out.dtype}")
    if weight.device != grad_out.device:
        raise ValueError(f"weight is on {weight.device}, expected {grad_out.device}")
    if len(input_shape) != 4:
        raise ValueError(f"input_shape must be [N, Cin, H, W], got {tuple(input_shape)}")
    N, Cin, H, W = (int(s) for s in input_shape)
    Cout, cin_g, KH, KW = _check_weight_dims(weight.shape, Cin, groups)
    cout_g = Cout // groups
    stride = _pair(stride, "stride", 1)
    padding = _pair(padding, "padding", 0)
    dilation = _pair(dilation, "dilation", 1)
    Ho, Wo = _out_hw(H, W, KH, KW, stride, padding, dilation, "conv2d_input_grad")
    if tuple(grad_out.shape) != (N, Cout, Ho, Wo):
        raise ValueError(f"grad_out must have the conv output shape {(N, Cout, Ho, Wo)} for "
                         f"input_shape {tuple(input_shape)}, got {tuple(grad_out.shape)}")
    bg = _check_bn_grad(bn_grad, grad_out)
    dev = grad_out.device
    gi = torch.empty((N, Cin, H, W), dtype=grad_out.dtype, device=dev,
                     memory_format=torch.channels_last)
    _check_rows(N * H * W, "conv2d_input_grad: N*H*W")
    if gi.numel() == 0:
        return gi
    w = _weight_khwc(weight)
    dummy = _dummy(dev)
    if bg is not None:
        z, bout, (bmean, ba, bb, bd) = bg
        bargs = (bout if bout is not None else dummy, z, bmean, ba, bb, bd)
    else:
        bargs = (dummy,) * 6
    sg, si = grad_out.stride(), gi.stride()
    KTOT = KH * KW * cin_g
    prec = _dot_precision(grad_out.dtype)
    for ph in range(min(stride[0], H)):
        kh0, khs, nkh, q0h, dqh = _phase_taps(ph, padding[0], stride[0], dilation[0], KH)
        HP = triton.cdiv(H - ph, stride[0])
        for pw in range(min(stride[1], W)):
            kw0, kws, nkw, q0w, dqw = _phase_taps(pw, padding[1], stride[1], dilation[1], KW)
            WP = triton.cdiv(W - pw, stride[1])
            M = N * HP * WP

            def grid(meta, M=M):
                return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(cin_g, meta["BLOCK_N"]),
                        groups)

            with _on(dev):
                _conv_dgrad_kernel[grid](
                    grad_out, w, gi, *bargs,
                    Ho, Wo, HP, WP, cin_g, cout_g, M, KTOT,
                    sg[0], sg[2], sg[3], si[0], si[2], si[3],
                    ph, pw, stride[0], stride[1],
                    kh0, kw0, khs, kws, nkh, nkw, q0h, q0w, dqh, dqw,
                    KW=KW, BN_GRAD=bg is not None, BN_RELU=bg is not None and bg[1] is not None,
                    DOT_PREC=prec)
    return gi


# ---- weight gradient -----------------------------------------------------------------

def _num_sms(device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def conv2d_weight_grad(x: torch.Tensor, grad_out: torch.Tensor, weight_shape,
                       stride: IntPair = 1, padding: IntPair = 0, dilation: IntPair = 1,
                       groups: int = 1, *,
                       in_scale: Optional[torch.Tensor] = None,
                       in_shift: Optional[torch.Tensor] = None, in_relu: bool = False,
                       bn_grad: Optional[BNGradPrologue] = None, split_k: Optional[int] = None
                       ) -> torch.Tensor:
    """grad_weight of a conv2d, **float32**, logical shape [Cout, Cin/groups, KH, KW] with
    channels_last strides (a permuted view of the kernel's [Cout, KH, KW, Cin/groups]
    buffer; call ``.contiguous()`` for NCHW strides, ``.to(dtype)`` for the weight dtype).
    The same prologue as ``conv2d`` is applied to ``x`` on load (x' = relu?(x*scale+shift),
    padding zero after it), so the normalised activation is never materialised.
    ``bn_grad``: optional BNGradPrologue folded into the grad_out loads.  ``split_k``:
    number of programs sharing the N*Ho*Wo reduction (default: enough to fill the GPU)."""
    x = _check_act(x, "x")
    grad_out = _check_act(grad_out, "grad_out", x.dtype, x.device)
    if len(weight_shape) != 4:
        raise ValueError(f"weight_shape must be [Cout, Cin/groups, KH, KW], got {tuple(weight_shape)}")
    N, Cin, H, W = x.shape
    Cout, cin_g, KH, KW = _check_weight_dims(weight_shape, Cin, groups, "weight_shape")
    cout_g = Cout // groups
    stride = _pair(stride, "stride", 1)
    padding = _pair(padding, "padding", 0)
    dilation = _pair(dilation, "dilation", 1)
    Ho, Wo = _out_hw(H, W, KH, KW, stride, padding, dilation, "conv2d_weight_grad")
    if tuple(grad_out.shape) != (N, Cout, Ho, Wo):
        raise ValueError(f"grad_out must have the conv output shape {(N, Cout, Ho, Wo)}, "
                         f"got {tuple(grad_out.shape)}")
    dev = x.device
    has_pro = in_scale is not None or in_shift is not None or bool(in_relu)
    if has_pro:
        scale = (_check_vec(in_scale, "in_scale", Cin, dev) if in_scale is not None
                 else torch.ones(Cin, dtype=torch.float32, device=dev))
        shift = (_check_vec(in_shift, "in_shift", Cin, dev) if in_shift is not None
                 else torch.zeros(Cin, dtype=torch.float32, device=dev))
    bg = _check_bn_grad(bn_grad, grad_out)

    KTOT = KH * KW * cin_g
    gw = torch.zeros((Cout, KH, KW, cin_g), dtype=torch.float32, device=dev)
    P = N * Ho * Wo
    _check_rows(P, "conv2d_weight_grad: N*Ho*Wo")
    if P == 0:
        return gw.permute(0, 3, 1, 2)
    flat_n = cin_g < _FLAT_CHANNELS
    taps = 1 if flat_n else KH * KW
    if split_k is None:
        # ~4 programs per SM assuming 64x64 output tiles, each split >= 8 K-steps of 64.
        n_cols = KTOT if flat_n else cin_g
        tiles = triton.cdiv(cout_g, 64) * triton.cdiv(n_cols, 64) * taps * groups
        split_k = max(1, min(4 * _num_sms(dev) // max(tiles, 1), triton.cdiv(P, 512)))
    split_k = int(max(1, min(split_k, P, 65535 // groups)))
    p_per = triton.cdiv(triton.cdiv(P, split_k), 64) * 64   # multiple of every BLOCK_K
    split_k = triton.cdiv(P, p_per)

    dummy = _dummy(dev)
    if bg is not None:
        z, bout, (bmean, ba, bb, bd) = bg
        bargs = (bout if bout is not None else dummy, z, bmean, ba, bb, bd)
    else:
        bargs = (dummy,) * 6
    sx, sg = x.stride(), grad_out.stride()

    def grid(meta):
        nn = KTOT if flat_n else cin_g
        return (triton.cdiv(cout_g, meta["BLOCK_M"]) * triton.cdiv(nn, meta["BLOCK_N"]),
                taps, groups * split_k)

    with _on(dev):
        _launch_accumulating(
            _conv_wgrad_kernel, grid, [gw],
            x, grad_out, gw, scale if has_pro else dummy, shift if has_pro else dummy, *bargs,
            H, W, Ho, Wo, cin_g, cout_g, P, KTOT, p_per, split_k,
            sx[0], sx[2], sx[3], sg[0], sg[2], sg[3],
            stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
            KH=KH, KW=KW, HAS_PROLOGUE=has_pro, IN_RELU=bool(in_relu), BN_GRAD=bg is not None,
            BN_RELU=bg is not None and bg[1] is not None, FLAT_N=flat_n, DOT_PREC=_dot_precision(x.dtype))
    return gw.permute(0, 3, 1, 2)
