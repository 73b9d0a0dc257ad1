#!/usr/bin/env python
"""Per-operator GPU benchmark of the fused_resnet CUDA primitives against the eager
PyTorch ops they replace, over the ResNet-50/152 batch-norm shapes.

    python benchmarks/bench_bn_ops.py                    # batch 256, bf16, channels_last
    python benchmarks/bench_bn_ops.py --shapes 256x64x56x56,256x2048x7x7 --iters 50
    python benchmarks/bench_bn_ops.py --allow-no-gpu     # exit 0 with 'skipped' on a CPU box

Compared, in one process on the same inputs (CUDA-event timing of each call after
warm-up, L2 flushed before every timed call unless --no-flush, median of --iters):
  bn_stats                 fused bn_stats        vs torch.var_mean / torch.batch_norm_stats
  bn_apply_relu            fused bn_apply        vs relu(F.batch_norm(eval))
  bn_apply_add_relu        fused bn_apply(+res)  vs relu(F.batch_norm(eval) + residual)
  bn_apply_proj_add_relu   fused bn_apply(+x2)   vs relu(F.batch_norm(eval) + F.batch_norm(eval, x2))
  bn_relu_backward         fused reduce + [C] coefficients + apply
                           vs autograd of relu(F.batch_norm(train)) (grads of x, weight, bias)
  bn_add_relu_backward     the same with the identity shortcut (grad_residual)
  bn_proj_add_relu_backward the same with the projection branch (x2)
  bn_backward_reduce / bn_backward_apply   the fused kernels alone
gbps is the op's minimal traffic (each input read once, each output written once,
the same number for every impl of an op) divided by the time; bw_fraction is gbps over
the device's copy bandwidth (a large tensor copy_, bytes read + written).

Writes benchmarks/results/bn_ops_<device>.json: {device, torch, triton, date, copy_gbps,
batch, dtype, memory_format, shape_counts, checks, rows: [{op, impl, shape, dtype, ms,
gbps, bw_fraction}]}. Exits 2 without a CUDA device (0 with --allow-no-gpu).

The distinct shapes are the same for ResNet-50 and ResNet-152 (only the number of
blocks differs); shape_counts gives how many BN layers of each model have each shape.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import statistics
import sys

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")

# (C, H, W) of every distinct conv output (= BN input) of torchvision's ResNet-50/152
# (v1.5: stride on the 3x3 conv), with the number of BN layers of that shape.
#                  C,    H,   W    resnet50 resnet152
SHAPES = [((64, 112, 112), 1, 1),      # stem
          ((64, 56, 56), 6, 6),        # layer1 conv1/conv2
          ((256, 56, 56), 4, 4),       # layer1 conv3 + downsample
          ((128, 56, 56), 1, 1),       # layer2.0 conv1
          ((128, 28, 28), 7, 15),      # layer2 conv2, conv1 of blocks 1..
          ((512, 28, 28), 5, 9),       # layer2 conv3 + downsample
          ((256, 28, 28), 1, 1),       # layer3.0 conv1
          ((256, 14, 14), 11, 71),     # layer3 conv2, conv1 of blocks 1..
          ((1024, 14, 14), 7, 37),     # layer3 conv3 + downsample
          ((512, 14, 14), 1, 1),       # layer4.0 conv1
          ((512, 7, 7), 5, 5),         # layer4 conv2, conv1 of blocks 1..
          ((2048, 7, 7), 4, 4)]        # layer4 conv3 + downsample

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
EPS = 1e-5


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--memory-format", choices=["channels_last", "contiguous"],
                   default="channels_last")
    p.add_argument("--shapes", default=None,
                   help="comma-separated NxCxHxW list (default: the ResNet-50/152 shapes)")
    p.add_argument("--ops", default=None, help="comma-separated subset of ops to run")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--no-flush", action="store_true", help="do not flush L2 between calls")
    p.add_argument("--out", default=None, help="output JSON (default results/bn_ops_<device>.json)")
    p.add_argument("--allow-no-gpu", action="store_true",
                   help="exit 0 (after printing 'skipped: no CUDA device') without a GPU")
    return p.parse_args(argv)


def device_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "gpu"


class Timer:
    """Median CUDA-event time of single calls; L2 flushed before each unless disabled."""

    def __init__(self, warmup: int, iters: int, flush: bool):
        self.warmup, self.iters = warmup, iters
        # 256 MiB: far more than the L2 of any current GPU (50 MiB on H100).
        self.flush_buf = torch.empty(64 * 2**20, dtype=torch.int32, device="cuda") if flush else None

    def __call__(self, fn) -> float:
        for _ in range(self.warmup):
            fn()
        torch.cuda.synchronize()
        events = []
        for _ in range(self.iters):
            if self.flush_buf is not None:
                self.flush_buf.zero_()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            events.append((s, e))
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in events)


def copy_bandwidth(timer: Timer) -> float:
    n = 2**30 // 4  # 1 GiB per tensor
    src = torch.empty(n, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    del src, dst
    return 2 * n * 4 / (ms * 1e-3) / 1e9


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    den = b.norm().item()
    return (a - b).norm().item() / den if den > 0 else (a - b).norm().item()


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        msg = "skipped: no CUDA device (torch.cuda.is_available() is False)"
        if args.allow_no_gpu:
            print(msg)
            return 0
        print(msg + "; pass --allow-no-gpu to make this a success", file=sys.stderr)
        return 2

    try:
        import fused_resnet  # noqa: F401  (loads fused_resnet._C: the CUDA kernels)
    except Exception as e:
        print(f"error: cannot import fused_resnet: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    if not torch._C._dispatch_has_kernel_for_dispatch_key("fused_resnet::bn_stats", "CUDA"):
        print("error: fused_resnet::bn_stats has no CUDA kernel: fused_resnet._C was built "
              "without csrc/cuda (rebuild with FUSED_RESNET_CUDA=1)", file=sys.stderr)
        return 2
    ops = torch.ops.fused_resnet

    dtype = DTYPES[args.dtype]
    mf = torch.channels_last if args.memory_format == "channels_last" else torch.contiguous_format
    if args.shapes:
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
        counts = {}
    else:
        shapes = [(args.batch, *chw) for chw, _, _ in SHAPES]
        counts = {"x".join(map(str, (args.batch, *chw))): {"resnet50": r50, "resnet152": r152}
                  for chw, r50, r152 in SHAPES}
    wanted = set(args.ops.split(",")) if args.ops else None

    torch.backends.cudnn.benchmark = True
    timer = Timer(args.warmup, args.iters, not args.no_flush)
    copy_gbps = copy_bandwidth(timer)
    dev_name = torch.cuda.get_device_name()
    print(f"device: {dev_name}   copy bandwidth: {copy_gbps:.0f} GB/s (read + write)")
    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = None

    rows, checks = [], []
    gen = torch.Generator(device="cuda")
    gen.manual_seed(0)

    def rnd(shape, offset=True):
        t = torch.empty(shape, dtype=dtype, device="cuda", memory_format=mf)
        t.normal_(generator=gen)
        if offset:
            t.add_(torch.rand(shape[1], generator=gen, device="cuda").mul_(2).sub_(1)
                   .view(1, -1, 1, 1).to(dtype))
        return t

    def vec(C, positive=False):
        v = torch.randn(C, generator=gen, device="cuda")
        return v.abs_().add_(0.5) if positive else v

    def record(op, impl, shape, ms, nbytes):
        gbps = nbytes / (ms * 1e-3) / 1e9
        rows.append({"op": op, "impl": impl, "shape": list(shape), "dtype": args.dtype,
                     "ms": round(ms, 5), "gbps": round(gbps, 1),
                     "bw_fraction": round(gbps / copy_gbps, 4)})
        print(f"  {op:<26} {impl:<24} {ms * 1e3:9.1f} us {gbps:8.0f} GB/s "
              f"{gbps / copy_gbps:6.1%}")

    def check(op, shape, err, tol):
        checks.append({"op": op, "shape": list(shape), "rel_err": err, "ok": err <= tol})
        if err > tol:
            print(f"  WARNING: {op} {shape}: fused vs eager relative error {err:.2e} > {tol:.0e}")

    def want(op):
        return wanted is None or op in wanted

    tol = 1e-2 if dtype != torch.float32 else 1e-4
    for shape in shapes:
        N, C, H, W = shape
        numel = N * C * H * W
        tb = numel * torch.empty((), dtype=dtype).element_size()  # one pass over a tensor
        n = N * H * W
        print(f"{'x'.join(map(str, shape))} {args.dtype} {args.memory_format}")
        x, r, x2, go = rnd(shape), rnd(shape), rnd(shape), rnd(shape, offset=False)
        w, b, w2, b2 = vec(C, True), vec(C), vec(C, True), vec(C)
        rm, rv, rm2, rv2 = vec(C), vec(C, True), vec(C), vec(C, True)

        # ---- statistics
        if want("bn_stats"):
            mean, var = ops.bn_stats(x)
            vm_var, vm_mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
            check("bn_stats", shape, rel_err(var, vm_var.float()), tol)
            record("bn_stats", "fused_cuda", shape, timer(lambda: ops.bn_stats(x)), tb)
            record("bn_stats", "eager_var_mean", shape,
                   timer(lambda: torch.var_mean(x, dim=(0, 2, 3), correction=0)), tb)
            record("bn_stats", "eager_batch_norm_stats", shape,
                   timer(lambda: torch.batch_norm_stats(x, EPS)), tb)

        # ---- forward application (eval-mode-like: given per-channel scale/shift)
        scale = w * torch.rsqrt(rv + EPS)
        shift = b - rm * scale
        scale2 = w2 * torch.rsqrt(rv2 + EPS)
        shift2 = b2 - rm2 * scale2

        def bn_eval(t, m, v, ww, bb):
            return F.batch_norm(t, m, v, ww, bb, training=False, eps=EPS)

        fwd = [
            ("bn_apply_relu", 2,
             lambda: ops.bn_apply(x, scale, shift, None, None, None, None, True),
             lambda: torch.relu(bn_eval(x, rm, rv, w, b))),
            ("bn_apply_add_relu", 3,
             lambda: ops.bn_apply(x, scale, shift, r, None, None, None, True),
             lambda: torch.relu(bn_eval(x, rm, rv, w, b) + r)),
            ("bn_apply_proj_add_relu", 3,
             lambda: ops.bn_apply(x, scale, shift, None, x2, scale2, shift2, True),
             lambda: torch.relu(bn_eval(x, rm, rv, w, b) + bn_eval(x2, rm2, rv2, w2, b2))),
        ]
        for op, passes, fused, eager in fwd:
            if not want(op):
                continue
            check(op, shape, rel_err(fused(), eager()), tol)
            record(op, "fused_cuda", shape, timer(fused), passes * tb)
            record(op, "eager", shape, timer(eager), passes * tb)

        # ---- backward of BN(train) + ReLU (+ shortcut)
        mean, var = ops.bn_stats(x)
        invstd = torch.rsqrt(var + EPS)
        mean2, var2 = ops.bn_stats(x2)
        invstd2 = torch.rsqrt(var2 + EPS)
        out_plain = ops.bn_apply(x, w * invstd, b - mean * w * invstd, None, None, None, None, True)
        out_add = ops.bn_apply(x, w * invstd, b - mean * w * invstd, r, None, None, None, True)
        out_proj = ops.bn_apply(x, w * invstd, b - mean * w * invstd, None, x2, w2 * invstd2,
                                b2 - mean2 * w2 * invstd2, True)

        def coeffs(sum_g, sum_gx, ww, inv):
            a = ww * inv
            return a, -a * inv * inv * sum_gx / n, -a * sum_g / n

        def fused_plain():
            sg, sgx, _ = ops.bn_backward_reduce(go, out_plain, x, mean, None, None)
            a_, b_, d_ = coeffs(sg, sgx, w, invstd)
            return ops.bn_backward_apply(go, out_plain, x, mean, a_, b_, d_, None, None, None,
                                         None, None, False)

        def fused_add():
            sg, sgx, _ = ops.bn_backward_reduce(go, out_add, x, mean, None, None)
            a_, b_, d_ = coeffs(sg, sgx, w, invstd)
            return ops.bn_backward_apply(go, out_add, x, mean, a_, b_, d_, None, None, None,
                                         None, None, True)

        def fused_proj():
            sg, sgx, sgx2 = ops.bn_backward_reduce(go, out_proj, x, mean, x2, mean2)
            a_, b_, d_ = coeffs(sg, sgx, w, invstd)
            a2_, b2_, d2_ = coeffs(sg, sgx2, w2, invstd2)
            return ops.bn_backward_apply(go, out_proj, x, mean, a_, b_, d_, x2, mean2, a2_, b2_,
                                         d2_, False)

        def eager_graph(kind):
            xr = x.detach().requires_grad_(True)
            wr, br = w.detach().requires_grad_(True), b.detach().requires_grad_(True)
            y = F.batch_norm(xr, None, None, wr, br, training=True, eps=EPS)
            inputs = [xr, wr, br]
            if kind == "add":
                rr = r.detach().requires_grad_(True)
                y = y + rr
                inputs.append(rr)
            elif kind == "proj":
                x2r = x2.detach().requires_grad_(True)
                w2r, b2r = w2.detach().requires_grad_(True), b2.detach().requires_grad_(True)
                y = y + F.batch_norm(x2r, None, None, w2r, b2r, training=True, eps=EPS)
                inputs += [x2r, w2r, b2r]
            y = torch.relu(y)
            return y, inputs

        bwd = [("bn_relu_backward", "plain", fused_plain, 7),
               ("bn_add_relu_backward", "add", fused_add, 8),
               ("bn_proj_add_relu_backward", "proj", fused_proj, 10)]
        for op, kind, fused, passes in bwd:
            if not want(op):
                continue
            y, inputs = eager_graph(kind)
            ref = torch.autograd.grad(y, inputs, go, retain_graph=True)
            gx, gs = fused()
            err = rel_err(gx, ref[0])
            if kind == "add":
                err = max(err, rel_err(gs, ref[3]))
            elif kind == "proj":
                err = max(err, rel_err(gs, ref[3]))
            check(op, shape, err, 5 * tol)
            record(op, "fused_cuda", shape, timer(fused), passes * tb)
            record(op, "eager", shape,
                   timer(lambda: torch.autograd.grad(y, inputs, go, retain_graph=True)),
                   passes * tb)
            del y, inputs, ref, gx, gs

        if want("bn_backward_reduce"):
            record("bn_backward_reduce", "fused_cuda", shape,
                   timer(lambda: ops.bn_backward_reduce(go, out_plain, x, mean, None, None)),
                   3 * tb)
        if want("bn_backward_apply"):
            a_, b_, d_ = vec(C), vec(C), vec(C)
            record("bn_backward_apply", "fused_cuda", shape,
                   timer(lambda: ops.bn_backward_apply(go, out_plain, x, mean, a_, b_, d_, None,
                                                       None, None, None, None, False)),
                   4 * tb)
        del x, r, x2, go, out_plain, out_add, out_proj
        torch.cuda.empty_cache()

    result = {
        "device": dev_name,
        "torch": torch.__version__,
        "triton": triton_version,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "copy_gbps": round(copy_gbps, 1),
        "batch": args.batch,
        "dtype": args.dtype,
        "memory_format": args.memory_format,
        "l2_flush": not args.no_flush,
        "warmup": args.warmup,
        "iters": args.iters,
        "shape_counts": counts,
        "checks": checks,
        "rows": rows,
    }
    out = args.out or os.path.join(RESULTS, f"bn_ops_{device_slug(dev_name)}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {out}")
    bad = [c for c in checks if not c["ok"]]
    if bad:
        print(f"error: {len(bad)} fused-vs-eager checks failed (see 'checks' in {out})",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
