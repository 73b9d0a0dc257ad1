#!/usr/bin/env python
"""Profile one training step of each model x implementation and say where the time goes.

For every model and implementation (the ones of `python -m fused_resnet bench`), after a
warm-up, one training step (forward + cross-entropy + backward + SGD) is timed, then one
more runs under torch.profiler (CPU + CUDA activities). The kernels are sorted by name
into convolution (cuDNN / CUTLASS / implicit-GEMM / Triton templates, and the fc GEMM),
normalisation / elementwise (batch norm, fused_resnet kernels, elementwise, reductions,
inductor's pointwise and reduction kernels) and other (pooling, loss, optimizer, copies,
layout transforms, anything unmatched); with the launch count and the total GPU time.
On CPU (--tiny) the same is done with the CPU self time of the operators.

Writes benchmarks/results/profile_<device>[_tiny].json and .md (or --out-dir).

    python benchmarks/profile_step.py          # GPU: resnet50 + resnet152, 224, batch 256
    python benchmarks/profile_step.py --tiny   # CPU, toy size, < 1 min (or FUSED_RESNET_TINY=1)
    python benchmarks/profile_step.py --model resnet50 --impl eager,fused --trace
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.autograd import DeviceType  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

from fused_resnet.tools import bench, report  # noqa: E402
from fused_resnet.tools.arguments import model_list, non_negative_int, positive_int  # noqa: E402

GPU = dict(models=["resnet50", "resnet152"], batch=256, resolution=224, dtype="bf16", warmup=3,
           impls=["eager", "eager-cl-amp", "compile", "fused"])
TINY = dict(models=["resnet18", "resnet50"], batch=2, resolution=32, dtype="bf16", warmup=1,
            impls=["eager", "eager-cl-amp", "fused"])

CATEGORIES = ("convolution", "normalisation/elementwise", "other")

# Kernel names (GPU), checked in this order; the first match wins.
GPU_PATTERNS = [
    ("normalisation/elementwise", r"^triton_(poi|red|per)_"),       # inductor pointwise/reductions
    ("convolution", r"^triton_tem_|conv(?!ert)"),                   # templates, Triton/CUDA convs
    ("other", r"multi_tensor|foreach|sgd|adam|pool|nll_loss|softmax|cross_entropy|memcpy|memset"
              r"|nchwtonhwc|nhwctonchw|transpose|permute|cat_|index|embedding"),
    ("normalisation/elementwise", r"bn_fw|bn_bw|bn_|batch_?norm|welford|fused_resnet"),
    ("convolution", r"cudnn|implicit|xmma|gemm|cutlass|wgrad|dgrad|fprop|winograd|hmma|"
                    r"_sm\d\d_|^sm\d\d_|ampere_|hopper_|volta_|turing_|nvjet|cublas"),
    ("normalisation/elementwise", r"norm|elementwise|vectorized|unrolled|reduce|relu|threshold|"
                                  r"add|mul|clamp|scale|shift|stats|triton"),
]
# Operator names (CPU self time).
CPU_PATTERNS = [
    ("normalisation/elementwise", r"fused_resnet::bn_|batch_norm"),
    ("convolution", r"conv(?!ert)|mkldnn|onednn|thnn|im2col|col2im|addmm|::mm$|::bmm$|linear|"
                    r"matmul"),
    ("other", r"pool|nll_loss|softmax|cross_entropy|sgd|foreach|profiler|train_step"),
    ("normalisation/elementwise", r"fused_resnet::|bn_|add|mul|relu|threshold|clamp|copy|sum|"
                                  r"mean|var|sub|div|rsqrt|sqrt|where|fill|zero|neg|pow|to_copy"),
]
LAUNCH_CALLS = re.compile(r"^(cudaLaunchKernel|cuLaunchKernel|cudaLaunchKernelExC|"
                          r"cudaLaunchCooperativeKernel|cudaGraphLaunch|cuLaunchKernelEx)")


def classify(name: str, patterns) -> str:
    low = name.lower()
    for category, pattern in patterns:
        if re.search(pattern, low):
            return category
    return "other"


def _empty_categories() -> dict:
    return {c: {"ms": 0.0, "count": 0} for c in CATEGORIES}


def summarise_gpu(prof) -> dict:
    """Kernel time by category, from the device events of the trace."""
    cats, kernels, launches = _empty_categories(), {}, 0
    for evt in prof.events():
        if getattr(evt, "device_type", DeviceType.CPU) == DeviceType.CPU:
            if LAUNCH_CALLS.match(evt.name or ""):
                launches += 1
            continue
        us = evt.time_range.elapsed_us()
        cat = classify(evt.name, GPU_PATTERNS)
        cats[cat]["ms"] += us / 1000.0
        cats[cat]["count"] += 1
        k = kernels.setdefault(evt.name, {"name": evt.name, "ms": 0.0, "count": 0,
                                          "category": cat})
        k["ms"] += us / 1000.0
        k["count"] += 1
    total = sum(c["ms"] for c in cats.values())
    return dict(time_kind="GPU kernel time", total_ms=total,
                kernels=sum(c["count"] for c in cats.values()), launch_calls=launches,
                categories=_with_pct(cats, total), top=_top(kernels))


def summarise_cpu(prof) -> dict:
    """Operator self CPU time by category."""
    cats, ops = _empty_categories(), {}
    for avg in prof.key_averages():
        if getattr(avg, "device_type", DeviceType.CPU) != DeviceType.CPU:
            continue
        ms = avg.self_cpu_time_total / 1000.0
        cat = classify(avg.key, CPU_PATTERNS)
        cats[cat]["ms"] += ms
        cats[cat]["count"] += avg.count
        ops[avg.key] = {"name": avg.key, "ms": ms, "count": avg.count, "category": cat}
    total = sum(c["ms"] for c in cats.values())
    return dict(time_kind="CPU operator self time", total_ms=total,
                kernels=sum(c["count"] for c in cats.values()), launch_calls=None,
                categories=_with_pct(cats, total), top=_top(ops))


def _with_pct(cats: dict, total: float) -> dict:
    for c in cats.values():
        c["pct"] = 100.0 * c["ms"] / total if total > 0 else 0.0
    return cats


def _top(entries: dict, n: int = 15) -> list:
    return sorted(entries.values(), key=lambda e: -e["ms"])[:n]


def profile_one(model_name: str, label: str, cfg: dict, device: torch.device, trace_dir=None,
                skip_reason=None) -> dict:
    spec = bench.plan_impl(label, cfg["dtype"])
    entry = dict(model=model_name, impl=label, dtype=spec.dtype, batch=cfg["batch"],
                 resolution=cfg["resolution"], setup=spec.describe(), status="ok", note="")
    reason = skip_reason
    if reason is None and spec.fused:
        entry["backend"], reason = bench.backend_status(spec.backend, device)
        if entry["backend"]:
            entry["setup"] += f" -> {entry['backend']}"
    if reason is not None:
        entry.update(status="unavailable", note=f"unavailable: {reason}")
        return entry
    state = bench.initial_state(model_name, 1000, 0)
    x, y = bench.make_inputs(cfg["batch"], cfg["resolution"], 1000, 0, device)
    model = step = None
    try:
        with bench.backend_context(spec):
            model = bench.build_model(spec, model_name, 1000, state, device)
            step = bench.make_step(spec, model, "train", x, y, cfg["compile_backend"])
            for _ in range(cfg["warmup"]):
                step()
            seconds, _, _ = bench.time_steps(step, 0, 1, device)
            activities = [ProfilerActivity.CPU]
            if device.type == "cuda":
                activities.append(ProfilerActivity.CUDA)
            with profile(activities=activities) as prof:
                with record_function("train_step"):
                    step()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
        summary = summarise_gpu(prof) if device.type == "cuda" else summarise_cpu(prof)
        entry.update(step_ms=1000.0 * seconds, img_per_s=cfg["batch"] / seconds, **summary)
        if trace_dir is not None:
            path = Path(trace_dir) / f"trace_{model_name}_{label}_{device.type}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            prof.export_chrome_trace(str(path))
            entry["trace"] = str(path)
    except torch.cuda.OutOfMemoryError as err:
        entry.update(status="unavailable", note=f"unavailable: out of memory ({err!s:.80})")
    except Exception as err:  # noqa: BLE001  (report and go on)
        entry.update(status="failed", note=f"failed: {type(err).__name__}: {err!s:.200}")
        import traceback
        traceback.print_exc()
    finally:
        del model, step
        if spec.compile_mode is not None:
            torch._dynamo.reset()
        bench.free_memory(device)
    return entry


def markdown(doc: dict) -> str:
    env = doc["environment"]
    kind = doc["entries"][0].get("time_kind", "time") if doc["entries"] else "time"
    lines = [f"# Where one training step's time goes: {env['device']} ({env['device_name']})", "",
             f"torch {env['torch']}, torchvision {env['torchvision']}, triton {env['triton']}; "
             f"batch {doc['batch']}, {doc['resolution']}x{doc['resolution']}, {doc['dtype']}; "
             f"{env['date']}.", "",
             f"Times are {kind} of one profiled step, by category of kernel/operator name "
             "(patterns in benchmarks/profile_step.py; convolution includes the fc GEMM); step ms "
             "is the wall time of an unprofiled step; kernels/ops = GPU kernels executed (on "
             "CPU: operator calls); launches = CUDA kernel launch API calls.", ""]
    headers = ["model", "impl", "step ms", "total ms", "kernels/ops", "launches"] + \
        [f"{c} ms (%)" for c in CATEGORIES] + ["notes"]
    rows = []
    for e in doc["entries"]:
        if e["status"] != "ok":
            rows.append([e["model"], e["impl"], "-", "-", "-", "-"] + ["-"] * len(CATEGORIES)
                        + [e["note"]])
            continue
        rows.append([e["model"], e["impl"], e["step_ms"], e["total_ms"], str(e["kernels"]),
                     "-" if e["launch_calls"] is None else str(e["launch_calls"])]
                    + [f"{e['categories'][c]['ms']:.1f} ({e['categories'][c]['pct']:.0f}%)"
                       for c in CATEGORIES] + [e["setup"]])
    lines += [report.markdown_table(headers, rows), ""]
    for e in doc["entries"]:
        if e["status"] != "ok":
            continue
        lines += [f"## {e['model']} {e['impl']}: top kernels", ""]
        lines += [report.markdown_table(
            ["name", "ms", "count", "category"],
            [[t["name"][:120], t["ms"], str(t["count"]), t["category"]] for t in e["top"]]), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true",
                   default=os.environ.get("FUSED_RESNET_TINY", "") not in ("", "0"),
                   help="CPU, toy size (resnet18 + resnet50, 32x32, batch 2), torch.compile "
                        "skipped; also FUSED_RESNET_TINY=1")
    p.add_argument("--model", type=model_list, default=None, metavar="NAME[,NAME]")
    p.add_argument("--impl", type=bench.impl_list, default=None, metavar="IMPL[,IMPL]",
                   help="default: eager, eager-cl-amp, compile, fused and every available "
                        "fused-<backend>")
    p.add_argument("--batch", type=positive_int, default=None)
    p.add_argument("--resolution", type=positive_int, default=None)
    p.add_argument("--dtype", choices=bench.BENCH_DTYPES, default=None)
    p.add_argument("--warmup", type=non_negative_int, default=None)
    p.add_argument("--device", choices=("cpu", "cuda"), default=None)
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--out-dir", default=str(report.DEFAULT_RESULTS_DIR))
    p.add_argument("--trace", action="store_true", help="also export a Chrome trace per run")
    args = p.parse_args(argv)

    base = TINY if args.tiny else GPU
    name = args.device or ("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    if name == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available on this machine")
    device = torch.device(name)
    if device.type != "cuda" and not args.tiny:
        report.note("no GPU: profiling on CPU at full size will be slow; use --tiny")
    cfg = dict(batch=args.batch or base["batch"], resolution=args.resolution or base["resolution"],
               dtype=args.dtype or base["dtype"],
               warmup=base["warmup"] if args.warmup is None else args.warmup,
               compile_backend=args.compile_backend)
    models = args.model or base["models"]
    impls = args.impl or base["impls"] + bench.available_fused_impls(device)
    skip = {}
    if args.tiny and device.type == "cpu":
        skip = {i: "skipped in --tiny mode on CPU (torch.compile takes minutes)" for i in impls
                if i.startswith("compile")}
    out_dir = Path(args.out_dir)
    tag = device.type + ("_tiny" if args.tiny else "")
    env = report.environment(device)
    entries = []
    t0 = time.perf_counter()
    with report.progress(len(models) * len(impls), desc="profile") as bar:
        for model_name in models:
            for label in impls:
                bar.set_description(f"profile {model_name} {label}")
                entries.append(profile_one(model_name, label, cfg, device,
                                           out_dir if args.trace else None, skip.get(label)))
                bar.update(1)
    doc = dict(device=env["device"], torch=env["torch"], triton=env["triton"], date=env["date"],
               environment=env, command=report.command_line(), mode="train",
               categories=list(CATEGORIES), batch=cfg["batch"], resolution=cfg["resolution"],
               dtype=cfg["dtype"], warmup=cfg["warmup"], seconds=time.perf_counter() - t0,
               entries=entries)
    json_path = report.write_json(out_dir / f"profile_{tag}.json", doc)
    md = markdown(doc)
    md_path = report.write_text(out_dir / f"profile_{tag}.md", md)
    print(md.split("\n## ")[0])
    print(f"wrote {json_path}\nwrote {md_path}")
    return 1 if any(e["status"] == "failed" for e in entries) else 0


if __name__ == "__main__":
    raise SystemExit(main())
