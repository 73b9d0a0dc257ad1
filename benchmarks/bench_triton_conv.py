"""Benchmark the Triton implicit-GEMM convolutions (kernels/conv.py) on every distinct
ResNet-50 conv shape (ResNet-101/152 use the same shapes), batch 256, bf16, channels_last,
against cuDNN plus the separate batch-norm kernels that the fusions replace.

Per shape, in one process, same inputs, CUDA-event timing after warm-up (the warm-up
includes Triton's autotuning):

  impl                       what runs                                              baseline
  cudnn_conv                 F.conv2d                                                -
  triton_conv                conv2d(x, w)                                            cudnn_conv
  cudnn_bn_relu_conv_stats   BN-apply+ReLU of the raw input (F.batch_norm eval-style
                             + relu_), F.conv2d, torch.batch_norm_stats of the output -
  triton_fused_train         conv2d(x_raw, w, in_scale, in_shift, in_relu, stats)   cudnn_bn_relu_conv_stats
                             (level 2 + 3: prologue and stats epilogue)
  triton_conv_stats          conv2d(x, w, stats=True) (level 2 alone)                cudnn_conv_stats
  cudnn_conv_stats           F.conv2d + torch.batch_norm_stats                       -
  cudnn_conv_bias_res_relu   F.conv2d(bias) + residual add_ + relu_ (eval, folded BN) -
  triton_eval_epilogue       conv2d(x, w, bias, residual, out_relu) (level 4)        cudnn_conv_bias_res_relu
  cudnn_dgrad / triton_dgrad aten.convolution_backward (input) / conv2d_input_grad   cudnn_dgrad
  cudnn_wgrad / triton_wgrad aten.convolution_backward (weight) / conv2d_weight_grad cudnn_wgrad

Row fields: op ("conv_<k>x<k>_s<stride>_<cin>_<cout>_<hw>", hw = input size), impl,
shape, dtype, ms (median), tflops (2*N*Ho*Wo*Cout*Cin*KH*KW / groups / time), baseline,
speedup_vs_cudnn (baseline ms / this ms; 1.0 for the cuDNN rows), bytes (the minimal HBM
traffic of the OPERATION, the same for both rows of a pair: inputs read once, outputs
written once, e.g. x + w + y for a conv, + the residual for the eval epilogue; the unfused
baseline moves more than this), bw_fraction (bytes / time / the device's peak HBM
bandwidth, i.e. the fraction of the memory roofline reached; null when the peak is unknown).

Usage:
  python benchmarks/bench_triton_conv.py                    # all shapes, writes JSON
  python benchmarks/bench_triton_conv.py --shapes 3 --batch 64 --reps 10
  python benchmarks/bench_triton_conv.py --allow-no-gpu     # exit 0 without a GPU
  python benchmarks/bench_triton_conv.py --compile-only     # no GPU needed: compile the
      kernels for sm_90 with Triton's bundled ptxas and report wgmma / cp.async / smem
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (k, stride, cin, cout, hw_in): every distinct ResNet-50 conv (padding = k // 2).
RESNET50_CONVS = [
    (7, 2, 3, 64, 224),                                                       # stem
    (1, 1, 64, 64, 56), (3, 1, 64, 64, 56), (1, 1, 64, 256, 56), (1, 1, 256, 64, 56),
    (1, 1, 256, 128, 56), (3, 2, 128, 128, 56), (1, 2, 256, 512, 56),         # layer2 entry
    (1, 1, 128, 512, 28), (1, 1, 512, 128, 28), (3, 1, 128, 128, 28),
    (1, 1, 512, 256, 28), (3, 2, 256, 256, 28), (1, 2, 512, 1024, 28),        # layer3 entry
    (1, 1, 256, 1024, 14), (1, 1, 1024, 256, 14), (3, 1, 256, 256, 14),
    (1, 1, 1024, 512, 14), (3, 2, 512, 512, 14), (1, 2, 1024, 2048, 14),      # layer4 entry
    (1, 1, 512, 2048, 7), (1, 1, 2048, 512, 7), (3, 1, 512, 512, 7),
]

# peak HBM bandwidth (bytes/s) by device-name substring, for bw_fraction
PEAK_BW = [("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12), ("A100-SXM4-80GB", 2.04e12),
           ("A100", 1.56e12)]


def op_name(k, s, cin, cout, hw):
    return f"conv_{k}x{k}_s{s}_{cin}_{cout}_{hw}"


def import_kernels():
    """fused_resnet.kernels.conv (the source tree's, when fused_resnet is not installed)."""
    sys.path.insert(0, ROOT)
    import fused_resnet.kernels as kernels
    if not kernels.AVAILABLE:
        raise SystemExit(f"fused_resnet kernels unavailable: {kernels.IMPORT_ERROR}")
    return kernels.conv


# ------------------------------------------------------------------- compile-only mode

def compile_only() -> int:
    """AOT-compile representative kernel variants for sm_90 (no GPU needed) and report
    whether the main loop uses wgmma and cp.async pipelining, shared memory, spills."""
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    C = import_kernels()

    def build(auto, ptr_types, ints, consts, cfg, tag):
        fn = auto.fn
        consts = {**consts, **cfg.kwargs}
        sig, attrs = {}, {}
        for i, name in enumerate(fn.arg_names):        # specialise like the JIT launcher
            if name in consts:
                sig[name] = "constexpr"
            elif name in ptr_types:
                sig[name] = ptr_types[name]
                attrs[(i,)] = [["tt.divisibility", 16]]
            elif ints[name] == 1:
                sig[name] = "constexpr"
                consts[name] = 1
            else:
                sig[name] = "i32"
                if ints[name] % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        t0 = time.time()
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                           target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
        ptx = k.asm["ptx"]
        mma = "wgmma" if "wgmma" in ptx else ("mma.sync" if "mma.sync" in ptx else "NO-MMA")
        print(f"{tag:34s} {fn.__name__:20s} tile {cfg.kwargs['BLOCK_M']}x{cfg.kwargs['BLOCK_N']}"
              f"x{cfg.kwargs['BLOCK_K']} w{cfg.num_warps} s{cfg.num_stages}: {mma}, "
              f"cp.async {ptx.count('cp.async.ca') + ptx.count('cp.async.cg')}, "
              f"smem {k.metadata.shared} B, local-mem ops {ptx.count('ld.local') + ptx.count('st.local')}"
              f" ({time.time() - t0:.1f}s)", flush=True)

    bf = "*bf16"
    f32 = "*fp32"

    def geo(N, Cin, H, W, Cout, k, s, p, d=1):
        Ho = (H + 2 * p - d * (k - 1) - 1) // s + 1
        Wo = (W + 2 * p - d * (k - 1) - 1) // s + 1
        return N, Cin, H, W, Cout, k, s, p, d, Ho, Wo

    def fwd(g, cfg, pro, tag):
        N, Cin, H, W, Cout, k, s, p, d, Ho, Wo = g
        ints = dict(H=H, W=W, Ho=Ho, Wo=Wo, CIN_G=Cin, COUT_G=Cout, M=N * Ho * Wo,
                    PART_ROWS=-(-N * Ho * Wo // 16), COUT=Cout, KTOT=k * k * Cin, sxn=H * W * Cin, sxh=W * Cin, sxw=Cin,
                    son=Ho * Wo * Cout, soh=Wo * Cout, sow=Cout, srn=Ho * Wo * Cout,
                    srh=Wo * Cout, srw=Cout, STRIDE_H=s, STRIDE_W=s, PAD_H=p, PAD_W=p,
                    DIL_H=d, DIL_W=d)
        ptrs = {n: bf for n in ("x_ptr", "w_ptr", "out_ptr", "res_ptr")}
        ptrs.update({n: f32 for n in ("scale_ptr", "shift_ptr", "bias_ptr", "part_ptr")})
        build(C._conv_fwd_kernel, ptrs, ints,
              dict(KH=k, KW=k, HAS_PROLOGUE=pro, IN_RELU=pro, HAS_BIAS=not pro, HAS_RES=not pro,
                   OUT_RELU=not pro, STATS=pro, FLAT_K=Cin < 16, DOT_PREC="tf32"), cfg, tag)

    def dgrad(g, cfg, bn, tag):
        N, Cin, H, W, Cout, k, s, p, d, Ho, Wo = g
        HP, WP = -(-H // s), -(-W // s)
        ints = dict(Ho=Ho, Wo=Wo, HP=HP, WP=WP, CIN_G=Cin, COUT_G=Cout, M=N * HP * WP,
                    KTOT=k * k * Cin, sgn=Ho * Wo * Cout, sgh=Wo * Cout, sgw=Cout,
                    sin_=H * W * Cin, sih=W * Cin, siw=Cin, PH=0, PW=0, STRIDE_H=s,
                    STRIDE_W=s, KH0=0, KW0=0, KH_STEP=s, KW_STEP=s, NKH=k, NKW=k, Q0H=p,
                    Q0W=p, DQH=1, DQW=1)
        ptrs = {n: bf for n in ("go_ptr", "w_ptr", "gi_ptr", "bo_ptr", "bz_ptr")}
        ptrs.update({n: f32 for n in ("bmean_ptr", "ba_ptr", "bb_ptr", "bd_ptr")})
        build(C._conv_dgrad_kernel, ptrs, ints,
              dict(KW=k, BN_GRAD=bn, BN_RELU=bn, DOT_PREC="tf32"), cfg, tag)

    def wgrad(g, cfg, pro, tag):
        N, Cin, H, W, Cout, k, s, p, d, Ho, Wo = g
        P = N * Ho * Wo
        ints = dict(H=H, W=W, Ho=Ho, Wo=Wo, CIN_G=Cin, COUT_G=Cout, P=P, KTOT=k * k * Cin,
                    P_PER_SPLIT=P // 4, SPLIT=4, sxn=H * W * Cin, sxh=W * Cin, sxw=Cin,
                    sgn=Ho * Wo * Cout, sgh=Wo * Cout, sgw=Cout, STRIDE_H=s, STRIDE_W=s,
                    PAD_H=p, PAD_W=p, DIL_H=d, DIL_W=d)
        ptrs = {n: bf for n in ("x_ptr", "go_ptr", "bo_ptr", "bz_ptr")}
        ptrs.update({n: f32 for n in ("gw_ptr", "scale_ptr", "shift_ptr", "bmean_ptr", "ba_ptr",
                                      "bb_ptr", "bd_ptr")})
        build(C._conv_wgrad_kernel, ptrs, ints,
              dict(KH=k, KW=k, HAS_PROLOGUE=pro, IN_RELU=pro, BN_GRAD=pro, BN_RELU=pro,
                   FLAT_N=Cin < 16, DOT_PREC="tf32"), cfg, tag)

    l1 = geo(256, 64, 56, 56, 64, 3, 1, 1)
    stem = geo(256, 3, 224, 224, 64, 7, 2, 3)
    l4 = geo(256, 512, 14, 14, 512, 3, 2, 1)
    for cfg in C._FWD_CONFIGS:
        fwd(l1, cfg, True, "fwd 3x3 64->64 @56 prologue+stats")
    fwd(l1, C._FWD_CONFIGS[0], False, "fwd 3x3 64->64 @56 eval epilogue")
    fwd(stem, C._FWD_CONFIGS[3], False, "fwd stem 7x7 s2 (flat K)")
    for cfg in C._DGRAD_CONFIGS[:2]:
        dgrad(l1, cfg, False, "dgrad 3x3 64->64 @56")
        dgrad(l1, cfg, True, "dgrad 3x3 64->64 @56 bn_grad")
    for cfg in C._WGRAD_CONFIGS[:2]:
        wgrad(l4, cfg, False, "wgrad 3x3 s2 512 @14")
        wgrad(l4, cfg, True, "wgrad 3x3 s2 512 @14 prologue+bn_grad")
    wgrad(stem, C._WGRAD_CONFIGS[3], False, "wgrad stem (flat N)")
    return 0


# --------------------------------------------------------------------------- GPU bench

def time_ms(fn, warmup, reps, torch):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def bench(args) -> int:
    import torch
    import torch.nn.functional as F
    import triton

    K = import_kernels()
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    peak_bw = next((bw for key, bw in PEAK_BW if key in name), None)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    esize = torch.finfo(dtype).bits // 8
    torch.backends.cudnn.benchmark = True
    rows = []
    shapes = RESNET50_CONVS[: args.shapes] if args.shapes else RESNET50_CONVS
    if args.only:
        shapes = [c for c in RESNET50_CONVS if re.search(args.only, op_name(*c))]
    N = args.batch
    for (k, s, cin, cout, hw) in shapes:
        p = k // 2
        op = op_name(k, s, cin, cout, hw)
        ho = (hw + 2 * p - k) // s + 1
        flops = 2.0 * N * ho * ho * cout * cin * k * k
        x_b = N * hw * hw * cin * esize
        y_b = N * ho * ho * cout * esize
        w_b = cout * cin * k * k * esize
        vec = 4 * cin
        g = torch.Generator(device=dev).manual_seed(0)
        x = torch.randn(N, cin, hw, hw, device=dev, generator=g).to(dtype) \
            .contiguous(memory_format=torch.channels_last)
        w = (torch.randn(cout, cin, k, k, device=dev, generator=g) / (cin * k * k) ** 0.5) \
            .to(dtype).contiguous(memory_format=torch.channels_last)
        mean = torch.randn(cin, device=dev, generator=g) * 0.1
        var = torch.rand(cin, device=dev, generator=g) + 0.5
        gamma = torch.rand(cin, device=dev, generator=g) + 0.5
        beta = torch.randn(cin, device=dev, generator=g) * 0.1
        invstd = torch.rsqrt(var + 1e-5)
        scale, shift = gamma * invstd, beta - mean * gamma * invstd
        bias = torch.randn(cout, device=dev, generator=g)
        res = torch.randn(N, cout, ho, ho, device=dev, generator=g).to(dtype) \
            .contiguous(memory_format=torch.channels_last)
        go = torch.randn(N, cout, ho, ho, device=dev, generator=g).to(dtype) \
            .contiguous(memory_format=torch.channels_last)
        x_shape = list(x.shape)

        def unfused_train():
            a = F.relu_(F.batch_norm(x, mean, var, gamma, beta, False, 0.0, 1e-5))
            y = F.conv2d(a, w, None, s, p)
            return torch.batch_norm_stats(y, 1e-5)

        def conv_stats():
            y = F.conv2d(x, w, None, s, p)
            return torch.batch_norm_stats(y, 1e-5)

        def eval_unfused():
            y = F.conv2d(x, w, bias.to(dtype), s, p)
            return y.add_(res).relu_()

        def cudnn_bwd(mask):
            return lambda: torch.ops.aten.convolution_backward(
                go, x, w, None, [s, s], [p, p], [1, 1], False, [0, 0], 1, mask)

        impls = [
            # name, fn, baseline, compulsory bytes
            ("cudnn_conv", lambda: F.conv2d(x, w, None, s, p), None, x_b + w_b + y_b),
            ("triton_conv", lambda: K.conv2d(x, w, s, p, 1, 1), "cudnn_conv", x_b + w_b + y_b),
            ("cudnn_conv_stats", conv_stats, None, x_b + w_b + y_b),
            ("triton_conv_stats", lambda: K.conv2d(x, w, s, p, 1, 1, stats=True),
             "cudnn_conv_stats", x_b + w_b + y_b),
            ("cudnn_bn_relu_conv_stats", unfused_train, None, x_b + vec + w_b + y_b),
            ("triton_fused_train", lambda: K.conv2d(x, w, s, p, 1, 1, in_scale=scale,
                                                    in_shift=shift, in_relu=True, stats=True),
             "cudnn_bn_relu_conv_stats", x_b + vec + w_b + y_b),
            ("cudnn_conv_bias_res_relu", eval_unfused, None, x_b + w_b + 2 * y_b),
            ("triton_eval_epilogue", lambda: K.conv2d(x, w, s, p, 1, 1, bias=bias, residual=res,
                                                      out_relu=True),
             "cudnn_conv_bias_res_relu", x_b + w_b + 2 * y_b),
        ]
        if not args.no_backward:
            impls += [
                ("cudnn_dgrad", cudnn_bwd([True, False, False]), None, y_b + w_b + x_b),
                ("triton_dgrad", lambda: K.conv2d_input_grad(go, w, x_shape, s, p, 1, 1),
                 "cudnn_dgrad", y_b + w_b + x_b),
                ("cudnn_wgrad", cudnn_bwd([False, True, False]), None, y_b + x_b + w_b),
                ("triton_wgrad", lambda: K.conv2d_weight_grad(x, go, w.shape, s, p, 1, 1),
                 "cudnn_wgrad", y_b + x_b + w_b),
                ("triton_wgrad_prologue", lambda: K.conv2d_weight_grad(
                    x, go, w.shape, s, p, 1, 1, in_scale=scale, in_shift=shift, in_relu=True),
                 "cudnn_wgrad", y_b + x_b + w_b),
            ]
        times = {}
        for impl, fn, base, nbytes in impls:
            t0 = time.time()
            try:
                ms = time_ms(fn, args.warmup, args.reps, torch)
            except Exception as e:  # noqa: BLE001  (report and keep going)
                print(f"{op:32s} {impl:26s} FAILED: {type(e).__name__}: {e}", flush=True)
                rows.append({"op": op, "impl": impl, "error": f"{type(e).__name__}: {e}"})
                continue
            times[impl] = ms
            speed = (times[base] / ms) if base in times else (1.0 if base is None else None)
            row = {"op": op, "impl": impl,
                   "shape": {"N": N, "Cin": cin, "Cout": cout, "H": hw, "W": hw, "k": k,
                             "stride": s, "padding": p, "Ho": ho, "Wo": ho},
                   "dtype": args.dtype, "ms": round(ms, 5),
                   "tflops": round(flops / ms / 1e9, 2),
                   "baseline": base,
                   "speedup_vs_cudnn": round(speed, 3) if speed is not None else None,
                   "bytes": int(nbytes),
                   "bw_fraction": round(nbytes / (ms * 1e-3) / peak_bw, 3) if peak_bw else None}
            rows.append(row)
            print(f"{op:32s} {impl:26s} {ms:8.3f} ms {row['tflops']:7.1f} TFLOP/s "
                  f"x{row['speedup_vs_cudnn'] if row['speedup_vs_cudnn'] is not None else '-'} "
                  f"bw {row['bw_fraction']}  ({time.time() - t0:.1f}s incl. warm-up/tuning)",
                  flush=True)
        del x, w, res, go
        torch.cuda.empty_cache()

    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    out_dir = os.path.join(ROOT, "benchmarks", "results")
    os.makedirs(out_dir, exist_ok=True)
    path = args.out or os.path.join(out_dir, f"triton_conv_{slug}.json")
    doc = {"device": name, "torch": torch.__version__, "triton": triton.__version__,
           "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
           "python": platform.python_version(),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "batch": N, "dtype": args.dtype, "memory_format": "channels_last",
           "timing": f"CUDA events, median of {args.reps} after {args.warmup} warm-up calls",
           "peak_hbm_bytes_per_s": peak_bw, "rows": rows}
    with open(path + ".tmp", "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(path + ".tmp", path)
    print(f"wrote {path}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    ap.add_argument("--shapes", type=int, default=0, help="only the first N shapes")
    ap.add_argument("--only", default="", help="regex on the op name")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--no-backward", action="store_true", help="skip the dgrad/wgrad rows")
    ap.add_argument("--out", default="", help="JSON path (default benchmarks/results/"
                                              "triton_conv_<device>.json)")
    ap.add_argument("--allow-no-gpu", action="store_true",
                    help="exit 0 (after a message) when no CUDA device is present")
    ap.add_argument("--compile-only", action="store_true",
                    help="no GPU needed: compile the kernels for sm_90 and report")
    args = ap.parse_args(argv)
    if args.compile_only:
        return compile_only()
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("bench_triton_conv: TRITON_INTERPRET=1 is set; the benchmark needs compiled "
              "kernels on a GPU", file=sys.stderr)
        return 0 if args.allow_no_gpu else 1
    try:
        import torch
    except ImportError:
        print("bench_triton_conv: torch is not installed", file=sys.stderr)
        return 0 if args.allow_no_gpu else 1
    if not torch.cuda.is_available():
        print("bench_triton_conv: no CUDA device; nothing to benchmark "
              "(use --compile-only to check the kernels compile for sm_90)", file=sys.stderr)
        return 0 if args.allow_no_gpu else 1
    return bench(args)


if __name__ == "__main__":
    sys.exit(main())
