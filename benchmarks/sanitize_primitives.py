#!/usr/bin/env python
"""Call every compiled fused_resnet primitive once per case on small tensors, for
compute-sanitizer (memcheck / racecheck) to watch, and check each result against the
plain-PyTorch oracle (fused_resnet.backends.primitives, float64 on the CPU).

    compute-sanitizer --tool memcheck python benchmarks/sanitize_primitives.py   # GPU
    python benchmarks/sanitize_primitives.py --device cpu                          # the C++ kernels

Covered: bn_stats, bn_apply (plain, + residual, + projection), bn_backward_reduce and
bn_backward_apply (with and without the ReLU mask, the projection and grad_residual),
bn_scale_shift, bn_stats_affine, bn_backward_coefficients (batch and running statistics),
bn_update_running_stats (several layers at once, sync-BN count), bn_fold, and the option-A
primitives when built; on channels_last and NCHW 4-d tensors, 2-d and 3-d inputs, odd
sizes (scalar paths), vectorisable sizes, and one size large enough for the split
reductions. Shapes are kept small: under a sanitizer every kernel runs 10-100x slower.

Exit code 0 when every case ran and agreed with the oracle, 1 otherwise, 2 when the
kernels are missing. --json PATH writes {device, cases: [{op, case, dtype, rel_err, tol,
ok}], ...}.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run from a checkout
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "bf16": torch.bfloat16,
          "fp16": torch.float16}
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 4e-2, torch.float16: 8e-3}
EPS = 1e-5
# (N, C, H, W): odd (scalar path), vectorisable, channel count above a warp, and one with
# enough rows for the reductions to split over several blocks
SHAPES = [(2, 5, 3, 7), (4, 64, 8, 8), (3, 130, 5, 9), (16, 32, 32, 32)]
QUICK_SHAPES = [(2, 5, 3, 7), (4, 64, 8, 8), (8, 32, 16, 16)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default=None,
                   help="default: cuda when available, else cpu")
    p.add_argument("--dtypes", default="bf16,fp32,fp64",
                   help="comma list among fp64, fp32, bf16, fp16 (default bf16,fp32,fp64)")
    p.add_argument("--quick", action="store_true", help="three small shapes only")
    p.add_argument("--json", default=None, metavar="PATH", help="write the results as JSON")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if a.shape != b.shape:
        return float("inf")
    den = b.norm().item()
    diff = (a - b).norm().item()
    return diff / den if den > 0 else diff


class Runner:
    def __init__(self, device: torch.device):
        self.device = device
        self.cases = []
        self.ops = torch.ops.fused_resnet

    def check(self, op, case, dtype, got, want, tol=None):
        got = got if isinstance(got, (tuple, list)) else (got,)
        want = want if isinstance(want, (tuple, list)) else (want,)
        tol = TOL[dtype] if tol is None else tol
        err = 0.0
        if len(got) != len(want):
            err = float("inf")
        for g, w in zip(got, want):
            if w is None or (g.numel() == 0 and w.numel() == 0):
                continue
            err = max(err, rel_err(g, w))
        ok = err <= tol
        self.cases.append(dict(op=op, case=case, dtype=str(dtype).replace("torch.", ""),
                               rel_err=err, tol=tol, ok=ok))
        if not ok:
            print(f"MISMATCH {op} {case} {dtype}: relative error {err:.3g} > {tol:.1g}",
                  flush=True)

    def error(self, op, case, dtype, err):
        self.cases.append(dict(op=op, case=case, dtype=str(dtype).replace("torch.", ""),
                               rel_err=None, tol=None, ok=False,
                               error=f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"))
        print(f"ERROR {op} {case} {dtype}: {type(err).__name__}: {err}", flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    import fused_resnet  # noqa: F401  (loads fused_resnet._C)
    from fused_resnet.backends import primitives as P

    name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    key = "CUDA" if dev.type == "cuda" else "CPU"
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    if not torch._C._dispatch_has_kernel_for_dispatch_key("fused_resnet::bn_stats", key):
        print(f"error: fused_resnet::bn_stats has no {key} kernel (fused_resnet._C not built "
              f"for {dev.type})", file=sys.stderr)
        return 2
    has_option_a = torch._C._dispatch_has_kernel_for_dispatch_key(
        "fused_resnet::bn_apply_option_a", key)
    dtypes = [DTYPES[d.strip()] for d in args.dtypes.split(",") if d.strip()]
    shapes = QUICK_SHAPES if args.quick else SHAPES
    torch.manual_seed(args.seed)
    R = Runner(dev)
    ops = R.ops
    t0 = time.perf_counter()

    def d64(t):  # the oracle's copy: float64 on the CPU, same memory format
        return None if t is None else t.detach().cpu().double()

    def on(t):
        return None if t is None else t.to(dev)

    def run(op, case, dtype, fn):
        try:
            fn()
        except Exception as err:  # noqa: BLE001  (record, go on with the other cases)
            R.error(op, case, dtype, err)

    for dtype in dtypes:
        acc = torch.float64 if dtype == torch.float64 else torch.float32

        def mk(shape, fmt, offset=0.0):
            t = (torch.randn(shape, dtype=torch.float64) * 1.5 + offset).to(dtype)
            if len(shape) == 4:
                t = t.contiguous(memory_format=fmt)
            return on(t)

        def vec(c, positive=False, dt=None):
            v = torch.randn(c, dtype=torch.float64)
            v = v.abs() + 0.5 if positive else v
            return on(v.to(dt or acc))

        cases = [(s, f) for s in shapes for f in (torch.channels_last, torch.contiguous_format)]
        cases += [((33, 24), None), ((4, 8, 17), None)]
        for shape, fmt in cases:
            C = shape[1]
            tag = "x".join(map(str, shape)) + ("" if fmt is None else
                                               ("_cl" if fmt == torch.channels_last else "_nchw"))
            x, x2, r, go = mk(shape, fmt, 0.7), mk(shape, fmt, -0.3), mk(shape, fmt), mk(shape, fmt)
            scale, shift, scale2, shift2 = vec(C), vec(C), vec(C), vec(C)

            def stats():
                R.check("bn_stats", tag, dtype, ops.bn_stats(x), P.bn_stats(d64(x)))
            run("bn_stats", tag, dtype, stats)

            def apply():
                for sub, res, xx2, relu in (("plain", None, None, True), ("res", r, None, True),
                                            ("proj", None, x2, True), ("norelu", None, None, False)):
                    got = ops.bn_apply(x, scale, shift, res, xx2, scale2 if xx2 is not None else None,
                                       shift2 if xx2 is not None else None, relu)
                    want = P.bn_apply(d64(x), d64(scale), d64(shift), d64(res), d64(xx2),
                                      d64(scale2) if xx2 is not None else None,
                                      d64(shift2) if xx2 is not None else None, relu)
                    R.check("bn_apply", f"{tag}/{sub}", dtype, got, want)
            run("bn_apply", tag, dtype, apply)

            mean, var = ops.bn_stats(x)
            mean2, var2 = ops.bn_stats(x2)
            out = ops.bn_apply(x, scale, shift, None, None, None, None, True)

            def reduce():
                for sub, o, xx2, m2 in (("masked", out, None, None), ("plain", None, None, None),
                                        ("proj", out, x2, mean2)):
                    got = ops.bn_backward_reduce(go, o, x, mean, xx2, m2)
                    want = P.bn_backward_reduce(d64(go), d64(o), d64(x), d64(mean), d64(xx2),
                                                d64(m2))
                    R.check("bn_backward_reduce", f"{tag}/{sub}", dtype, got, want,
                            tol=TOL[dtype] * 4)
            run("bn_backward_reduce", tag, dtype, reduce)

            def bwd_apply():
                a, b, d = vec(C), vec(C), vec(C)
                a2, b2, d2 = vec(C), vec(C), vec(C)
                for sub, o, xx2, gr in (("masked", out, None, False), ("residual", out, None, True),
                                        ("plain", None, None, False), ("proj", out, x2, False)):
                    p2 = (mean2, a2, b2, d2) if xx2 is not None else (None,) * 4
                    got = ops.bn_backward_apply(go, o, x, mean, a, b, d, xx2, *p2, gr)
                    want = P.bn_backward_apply(d64(go), d64(o), d64(x), d64(mean), d64(a), d64(b),
                                               d64(d), d64(xx2), *[d64(t) for t in p2], gr)
                    R.check("bn_backward_apply", f"{tag}/{sub}", dtype, got, want)
            run("bn_backward_apply", tag, dtype, bwd_apply)

            def finish():
                gamma, beta = vec(C, dt=torch.float32), vec(C, dt=torch.float32)
                R.check("bn_scale_shift", tag, dtype,
                        ops.bn_scale_shift(mean, var, gamma, beta, EPS),
                        P.bn_scale_shift(d64(mean), d64(var), d64(gamma), d64(beta), EPS),
                        tol=TOL[acc])
                R.check("bn_stats_affine", tag, dtype, ops.bn_stats_affine(x, gamma, beta, EPS),
                        P.bn_stats_affine(d64(x), d64(gamma), d64(beta), EPS))
                R.check("bn_stats_affine", tag + "/plain", dtype,
                        ops.bn_stats_affine(x, None, None, EPS),
                        P.bn_stats_affine(d64(x), None, None, EPS))
                for sub, o, batch, proj in (("batch", out, True, False), ("running", out, False, False),
                                            ("proj", out, True, True), ("nomask", None, True, True)):
                    p2 = (x2, mean2, var2, beta) if proj else (None,) * 4
                    a_ = (go, o, x, mean, var, gamma, EPS, batch, *p2, 1e-3)
                    got = ops.bn_backward_coefficients(*a_)
                    want = P.bn_backward_coefficients(*[d64(t) if isinstance(t, torch.Tensor) else t
                                                        for t in a_])
                    R.check("bn_backward_coefficients", f"{tag}/{sub}", dtype, got, want,
                            tol=TOL[dtype] * 4)
            run("bn_scale_shift", tag, dtype, finish)

            if has_option_a and len(shape) == 4 and fmt is not None:
                def option_a():
                    n, c, h, w = shape
                    cin, s = max(1, c // 2), 2
                    sc = mk((n, cin, h * s, w * s), fmt)
                    got = ops.bn_apply_option_a(x, scale, shift, sc, s, True)
                    want = P.bn_apply_option_a(d64(x), d64(scale), d64(shift), d64(sc), s, True)
                    R.check("bn_apply_option_a", tag, dtype, got, want)
                    a, b, d = vec(C), vec(C), vec(C)
                    got = ops.bn_backward_apply_option_a(go, out, x, mean, a, b, d,
                                                         list(sc.shape), s)
                    want = P.bn_backward_apply_option_a(d64(go), d64(out), d64(x), d64(mean),
                                                        d64(a), d64(b), d64(d), list(sc.shape), s)
                    R.check("bn_backward_apply_option_a", tag, dtype, got, want)
                run("bn_apply_option_a", tag, dtype, option_a)

        # per-layer steps: the running statistics of three layers at once, and bn_fold
        def running():
            layers = [5, 64, 130]
            rms = [vec(c) for c in layers]
            rvs = [vec(c, positive=True) for c in layers]
            nbts = [on(torch.zeros((), dtype=torch.long)) for _ in layers]
            means = [vec(c) for c in layers]
            variances = [vec(c, positive=True) for c in layers]
            counts = [12, 40, 7]
            refs = [(d64(m), d64(v), d64(t).long()) for m, v, t in zip(rms, rvs, nbts)]
            ops.bn_update_running_stats(rms, rvs, nbts, means, variances, counts,
                                        [0.1, 0.0, 0.3], [False, True, False])
            for i, (rm, rv, nbt) in enumerate(refs):
                P.bn_update_running_stats(rm, rv, nbt, d64(means[i]), d64(variances[i]),
                                          counts[i], [0.1, 0.0, 0.3][i], [False, True, False][i])
                R.check("bn_update_running_stats", f"layer{i}", dtype,
                        (rms[i], rvs[i]), (rm, rv), tol=TOL[acc] * 10)
            # sync BN: var carries the count as a (C + 1)-th element
            c = 64
            rm, rv, nbt = vec(c), vec(c, positive=True), on(torch.zeros((), dtype=torch.long))
            m, v = vec(c), vec(c, positive=True)
            ref = (d64(rm), d64(rv), d64(nbt).long())
            synced = torch.cat([v, on(torch.tensor([96.0], dtype=acc))])
            ops.bn_update_running_stats([rm], [rv], [nbt], [m], [synced], [5], [0.1], [False])
            P.bn_update_running_stats(*ref, d64(m), d64(v), 96, 0.1, False)
            R.check("bn_update_running_stats", "sync", dtype, (rm, rv), ref[:2], tol=TOL[acc] * 10)
        run("bn_update_running_stats", "layers", dtype, running)

        def fold():
            for cout, cin, k in ((64, 32, 3), (7, 5, 1)):
                w = (torch.randn(cout, cin, k, k, dtype=torch.float64) / (cin * k * k) ** 0.5)
                w = on(w.to(dtype)
                       .contiguous(memory_format=torch.channels_last))
                gamma, beta = vec(cout, dt=torch.float32), vec(cout, dt=torch.float32)
                rmean, rvar = vec(cout, dt=torch.float32), vec(cout, positive=True, dt=torch.float32)
                for out_dtype in (None, torch.bfloat16):
                    got = ops.bn_fold(w, gamma, beta, rmean, rvar, EPS, out_dtype)
                    want = P.bn_fold(d64(w), d64(gamma), d64(beta), d64(rmean), d64(rvar), EPS,
                                     None)
                    tol = TOL[torch.bfloat16] if out_dtype is not None else TOL[dtype]
                    R.check("bn_fold", f"{cout}x{cin}x{k}/{out_dtype or 'same'}", dtype, got,
                            want, tol=max(tol, TOL[torch.float32]))
        run("bn_fold", "conv", dtype, fold)

    if dev.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    bad = [c for c in R.cases if not c["ok"]]
    by_op = {}
    for c in R.cases:
        by_op.setdefault(c["op"], [0, 0])
        by_op[c["op"]][0 if c["ok"] else 1] += 1
    for op, (ok, nok) in by_op.items():
        print(f"  {op:28s} {ok:4d} ok {nok:4d} failed")
    print(f"sanitize_primitives: {dev.type}, {len(R.cases)} checks over "
          f"{', '.join(str(d).replace('torch.', '') for d in dtypes)}, {len(bad)} failed, "
          f"{seconds:.1f} s (option-A primitives {'included' if has_option_a else 'not built'})")
    if args.json:
        doc = dict(device=dev.type, device_name=(torch.cuda.get_device_name(dev)
                                                 if dev.type == "cuda" else "cpu"),
                   torch=torch.__version__, dtypes=args.dtypes, shapes=[list(s) for s in shapes],
                   option_a=has_option_a, seconds=seconds, failed=len(bad), cases=R.cases)
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
        print(f"wrote {args.json}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
