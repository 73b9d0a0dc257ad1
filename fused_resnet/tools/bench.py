"""Time eager PyTorch, torch.compile and the fused models side by side (img/s, peak memory,
dispatched ops and host milliseconds per step).

Every implementation runs in this process on the same input batch and from the same
initial weights (the torchvision model's state_dict; the fused models are made with
fused_resnet.convert), one after the other, and all at the run's precision (--dtype:
fp32, or autocast bf16 / fp16 with fp32 weights) and memory format (--memory-format,
channels_last by default) unless a label overrides them (`eager@fp32@nchw`):

  eager                 torchvision (the baseline of the ratios)
  eager-cl-amp          torchvision, channels_last under autocast (needs --dtype bf16/fp16)
  compile               torch.compile(torchvision model)
  compile-max-autotune  the same with mode="max-autotune"
  fused                 fused_resnet model, backend auto
  fused-<backend>       the same on one backend: reference, cpu, cuda, triton
  eager-graphs          eager's whole step captured in one CUDA graph (tools/cuda_graphs.py)
  compile-graphs        torch.compile(mode="reduce-overhead") (its own CUDA graphs)
  fused-graphs          fused's whole step captured in one CUDA graph

train = forward + cross-entropy + backward + SGD step (momentum 0.9, weight decay 1e-4);
infer = eval() + no_grad forward. CUDA timing uses CUDA events after the warm-up.
ops/step: the ops one step dispatches (fused_resnet.testing.dispatch.DispatchCounter;
not for the compiled and captured rows, whose ops do not go through the dispatcher one by
one); host ms/step: the main thread's CPU time per timed step (on a GPU, what issuing the
step costs the host).

Examples:
  python -m fused_resnet bench                                     # machine-suited defaults
  python -m fused_resnet bench --model resnet152 --mode both --impl eager,fused,fused-cpu --out
  python -m fused_resnet bench --suite gpu                         # the full GPU matrix
  python -m fused_resnet bench --suite gpu --tiny                  # the same code path, tiny, CPU
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
import torchvision

import fused_resnet

from ..testing.dispatch import DispatchCounter
from . import report
from .cuda_graphs import GraphedTrainStep
from .arguments import (MODELS, comma_list, model_list, non_negative_int, positive_int,
                        positive_int_list, unwritable)

FUSED_BACKENDS = ("reference", "cpu", "cuda", "triton")
GRAPH_IMPLS = ("eager-graphs", "compile-graphs", "fused-graphs")
IMPLS = ("eager", "eager-cl-amp", "compile", "compile-max-autotune", "fused") + tuple(
    f"fused-{b}" for b in FUSED_BACKENDS) + GRAPH_IMPLS
BENCH_DTYPES = ("fp32", "bf16", "fp16")
LAYOUTS = {"cl": True, "nchw": False}      # label suffixes: channels_last or not
MEMORY_FORMATS = ("channels_last", "contiguous")
MODES = ("train", "infer", "both")
AUTO_OUT = "<auto>"

# Defaults that suit the machine: a CPU run of about a minute on a few cores, or the
# standard GPU training benchmark.
CPU_DEFAULTS = dict(model="resnet50", resolution=128, batch=16, dtype="fp32", mode="train",
                    impl="eager,compile,fused", warmup=1, steps=4)
GPU_DEFAULTS = dict(model="resnet50", resolution=224, batch=256, dtype="bf16", mode="train",
                    impl="eager,compile,fused,fused-graphs", warmup=10, steps=30)

# `--suite gpu`: everything the GPU benchmark issue asks for. `--tiny`: the same loop on
# CPU at toy size (torch.compile is skipped there: it takes minutes per model on CPU).
SUITE_GPU = dict(models=("resnet50", "resnet152"), batches=(256, 128), modes=("train", "infer"),
                 resolution=224, dtype="bf16", warmup=10, steps=30,
                 impls=("eager", "compile", "compile-max-autotune", "fused") + GRAPH_IMPLS)
SUITE_TINY = dict(models=("resnet18", "resnet50"), batches=(2,), modes=("train", "infer"),
                  resolution=32, dtype="bf16", warmup=1, steps=1,
                  impls=("eager", "compile", "compile-max-autotune", "fused") + GRAPH_IMPLS)

PEAK_MEM_FOOTNOTE_CPU = ("peak memory is reported only on CUDA (torch.cuda.max_memory_allocated "
                         "after a reset per implementation); CPU allocations are not tracked, "
                         "so it is null here")


# --- arguments ------------------------------------------------------------------------------

def impl_list(text: str) -> list:
    """Comma-separated implementations, each optionally with @dtype and @layout suffixes
    (`eager@fp32@nchw`)."""
    items = comma_list(text, "one or more implementations")
    for item in items:
        name, *suffixes = item.split("@")
        if name not in IMPLS:
            raise argparse.ArgumentTypeError(
                f"unknown implementation {name!r}; choose from: {', '.join(IMPLS)} "
                "(optionally with @fp32|@bf16|@fp16 and @cl|@nchw)")
        for suffix in suffixes:
            if suffix not in BENCH_DTYPES and suffix not in LAYOUTS:
                raise argparse.ArgumentTypeError(
                    f"unknown suffix {suffix!r} in {item!r}; choose a dtype "
                    f"({', '.join(BENCH_DTYPES)}) or a layout ({', '.join(LAYOUTS)})")
            if name == "eager-cl-amp" and suffix in ("fp32", "nchw"):
                raise argparse.ArgumentTypeError(
                    f"eager-cl-amp is channels_last under autocast: not {item!r}")
    return list(dict.fromkeys(items))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = "default: {cpu} on CPU, {gpu} on CUDA"

    def both(key):
        return d.format(cpu=CPU_DEFAULTS[key], gpu=GPU_DEFAULTS[key])

    parser.add_argument("--model", type=model_list, default=None, metavar="NAME[,NAME]",
                        help=f"model(s) of the zoo: {', '.join(MODELS)} ({both('model')})")
    parser.add_argument("--mode", choices=MODES, default=None,
                        help="train (forward+backward+SGD), infer (eval, no_grad) or both "
                             "(default: train)")
    parser.add_argument("--batch", type=positive_int_list, default=None, metavar="N[,N]",
                        help=f"batch size(s) ({both('batch')})")
    parser.add_argument("--dtype", choices=BENCH_DTYPES, default=None,
                        help=f"the precision of every implementation: fp32, or autocast "
                             f"bf16 / fp16 with fp32 weights ({both('dtype')})")
    parser.add_argument("--memory-format", choices=MEMORY_FORMATS, default="channels_last",
                        help="the memory format of every implementation (default "
                             "channels_last)")
    parser.add_argument("--resolution", type=positive_int, default=None, metavar="R",
                        help=f"input height and width ({both('resolution')})")
    parser.add_argument("--impl", type=impl_list, default=None, metavar="IMPL[,IMPL]",
                        help=f"comma-separated implementations among {', '.join(IMPLS)}, "
                             f"each optionally @dtype and @cl / @nchw ({both('impl')})")
    parser.add_argument("--warmup", type=non_negative_int, default=None,
                        help=f"untimed steps first ({both('warmup')})")
    parser.add_argument("--steps", type=positive_int, default=None,
                        help=f"timed steps ({both('steps')})")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: cuda when available, else cpu")
    parser.add_argument("--num-classes", type=positive_int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", nargs="?", const=AUTO_OUT, default=None, metavar="PATH",
                        help="write JSON + a PNG bar chart with the same stem; without a value "
                             "benchmarks/results/bench_<model>_<mode>_<device>.json; a bare file "
                             "name or a directory goes to / under benchmarks/results/ resp. it")
    parser.add_argument("--suite", choices=("gpu",), default=None,
                        help="run the GPU benchmark matrix (resnet50 and resnet152, 224x224, "
                             "batch 256 and 128, train and infer, eager / eager-cl-amp / compile "
                             "/ compile-max-autotune / every available fused backend), one "
                             "JSON + PNG per run and a summary, into benchmarks/results/ (or --out "
                             "DIR); --model/--batch/--mode/--impl/--warmup/--steps narrow it")
    parser.add_argument("--tiny", action="store_true",
                        default=os.environ.get("FUSED_RESNET_TINY", "") not in ("", "0"),
                        help="with --suite: the same code path on CPU at toy size (resnet18 and "
                             "resnet50, 32x32, batch 2, 1 step; compile skipped); also "
                             "FUSED_RESNET_TINY=1")
    parser.add_argument("--skip-existing", action="store_true",
                        help="with --suite: skip runs whose JSON already exists (to resume)")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend for the compile impls (default inductor; "
                             "'eager' or 'aot_eager' to debug without code generation)")
    parser.add_argument("--strict", action="store_true",
                        help="exit 1 when a requested implementation is unavailable")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


# --- what each implementation is ----------------------------------------------------------

@dataclass
class ImplSpec:
    label: str                       # as requested, e.g. "fused-cpu" or "eager@bf16"
    name: str                        # without the @dtype
    dtype: str                       # the dtype the row reports
    param_dtype: torch.dtype         # parameters and inputs
    amp_dtype: Optional[torch.dtype]  # autocast dtype, or None
    channels_last: bool
    compile_mode: Optional[str] = None   # None: no torch.compile
    fused: bool = False
    backend: Optional[str] = None    # fused_resnet backend ("auto", "cpu", ...)
    graphs: bool = False             # the whole step captured in a CUDA graph
    skip: Optional[str] = None       # why it will not run (reported, not raised)

    @property
    def layout(self) -> str:
        return "channels_last" if self.channels_last else "NCHW"

    def describe(self) -> str:
        parts = [self.layout]
        parts.append(f"autocast {report.DTYPE_NAMES[self.amp_dtype]}" if self.amp_dtype
                     else f"{report.DTYPE_NAMES[self.param_dtype]} weights")
        if self.compile_mode:
            parts.append(f"torch.compile(mode={self.compile_mode})")
        if self.fused:
            parts.append(f"fused_resnet backend {self.backend}")
        if self.graphs:
            parts.append("whole step in one CUDA graph")
        return ", ".join(parts)


def plan_impl(label: str, dtype: str, channels_last: bool = True) -> ImplSpec:
    """What `label` runs at the run's dtype and layout (its @ suffixes override them)."""
    name, *suffixes = label.split("@")
    for suffix in suffixes:
        if suffix in LAYOUTS:
            channels_last = LAYOUTS[suffix]
        else:
            dtype = suffix
    amp = report.DTYPES[dtype] if dtype in ("bf16", "fp16") else None
    skip = None
    if name == "eager-cl-amp":
        channels_last = True
        if amp is None:
            skip = "eager-cl-amp runs under autocast: needs --dtype bf16 or fp16"
    spec = ImplSpec(label, name, dtype, torch.float32, amp, channels_last, skip=skip)
    if name in ("compile", "compile-max-autotune", "compile-graphs"):
        spec.compile_mode = {"compile": "default", "compile-max-autotune": "max-autotune",
                             "compile-graphs": "reduce-overhead"}[name]
    elif name.startswith("fused"):
        spec.fused = True
        spec.backend = name[len("fused-"):] if name.startswith("fused-") and \
            name != "fused-graphs" else "auto"
    elif name not in ("eager", "eager-cl-amp", "eager-graphs"):
        raise ValueError(f"unknown implementation {label!r}")
    spec.graphs = name in ("eager-graphs", "fused-graphs")
    return spec


def backend_status(backend: str, device: torch.device) -> tuple:
    """(resolved backend name or None, reason it is unavailable or None)."""
    try:
        return fused_resnet.backends.resolve(device, backend).name, None
    except fused_resnet.BackendUnavailableError as err:
        return None, str(err).split(": ", 1)[-1]
    except KeyError:
        return None, f"the {backend!r} backend is not part of this build of fused_resnet"


def available_fused_impls(device: torch.device) -> list:
    """fused-<backend> for every backend that runs on `device`."""
    return [f"fused-{b}" for b in FUSED_BACKENDS if backend_status(b, device)[1] is None]


# --- building and stepping ------------------------------------------------------------------

def torchvision_model(name: str, num_classes: int) -> torch.nn.Module:
    return getattr(torchvision.models, name)(num_classes=num_classes)


def initial_state(name: str, num_classes: int, seed: int) -> dict:
    """The initial weights every implementation starts from (CPU tensors)."""
    torch.manual_seed(seed)
    model = torchvision_model(name, num_classes)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def make_inputs(batch: int, resolution: int, num_classes: int, seed: int,
                device: torch.device) -> tuple:
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, 3, resolution, resolution, generator=g)
    y = torch.randint(0, num_classes, (batch,), generator=g)
    return x.to(device), y.to(device)


def build_model(spec: ImplSpec, model_name: str, num_classes: int, state: dict,
                device: torch.device) -> torch.nn.Module:
    model = torchvision_model(model_name, num_classes)
    model.load_state_dict(state)
    if spec.fused:
        model = fused_resnet.convert(model, inplace=True)
    model = model.to(device=device, dtype=spec.param_dtype)
    if spec.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def backend_context(spec: ImplSpec):
    if not spec.fused:
        return contextlib.nullcontext()
    return fused_resnet.use_backend(spec.backend)


def make_step(spec: ImplSpec, model: torch.nn.Module, mode: str, x: torch.Tensor,
              y: torch.Tensor, compile_backend: str = "inductor") -> Callable[[], None]:
    """One training or inference step of `model` on (x, y), as `spec` says."""
    device_type = x.device.type
    x = x.to(spec.param_dtype)
    if spec.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if spec.graphs:
        return captured_step(spec, model, mode, x, y)

    def amp():
        if spec.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=spec.amp_dtype)

    fn = model
    if spec.compile_mode is not None:
        torch._dynamo.reset()   # a fresh cache per implementation: no recompile limit, no reuse
        kwargs = {"backend": compile_backend}
        if compile_backend == "inductor" and spec.compile_mode != "default":
            kwargs["mode"] = spec.compile_mode
        fn = torch.compile(model, **kwargs)

    if mode == "train":
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)

        def step():
            opt.zero_grad(set_to_none=True)
            with amp():
                out = fn(x)
            loss = F.cross_entropy(out.float(), y)
            loss.backward()
            opt.step()
    else:
        model.eval()

        def step():
            with torch.no_grad(), amp():
                fn(x)
    return step


def captured_step(spec: ImplSpec, model: torch.nn.Module, mode: str, x: torch.Tensor,
                  y: torch.Tensor) -> Callable[[], None]:
    """The step as one CUDA-graph replay (the training step: tools/cuda_graphs.py)."""
    if mode == "train":
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
        graphed = GraphedTrainStep(model, opt, x, y, amp_dtype=spec.amp_dtype)
        return graphed.graph.replay
    model.eval()
    amp = (torch.autocast("cuda", dtype=spec.amp_dtype, cache_enabled=False)
           if spec.amp_dtype is not None else contextlib.nullcontext())
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), amp:
        with torch.cuda.stream(side):
            for _ in range(3):
                model(x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            model(x)
    return graph.replay


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _repeat(step: Callable[[], None], n: int, bar=None) -> None:
    for _ in range(n):
        step()
        if bar is not None:
            bar.update(1)


def time_steps(step: Callable[[], None], warmup: int, steps: int, device: torch.device,
               bar=None) -> tuple:
    """(seconds for `steps` timed steps, seconds of the warm-up, host CPU seconds of the
    timed steps: the main thread's, without the final wait for the device)."""
    t0 = time.perf_counter()
    _repeat(step, warmup, bar)
    _sync(device)
    warm = time.perf_counter() - t0
    if device.type == "cuda":
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        host0 = time.thread_time()
        _repeat(step, steps, bar)
        host = time.thread_time() - host0
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0, warm, host
    t0, host0 = time.perf_counter(), time.thread_time()
    _repeat(step, steps, bar)
    return time.perf_counter() - t0, warm, time.thread_time() - host0


def count_dispatched(step: Callable[[], None], spec: ImplSpec) -> tuple:
    """(ops, host syncs) of one step, or (None, None) for the compiled and captured rows."""
    if spec.compile_mode is not None or spec.graphs:
        return None, None
    with DispatchCounter() as counter:
        step()
    return counter.launches, counter.syncs


def free_memory(device: torch.device) -> None:
    """Collect what the last implementation left (and give CUDA's cache back)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


@dataclass
class Config:
    model: str
    mode: str                   # train | infer
    batch: int
    dtype: str
    resolution: int
    impls: list
    warmup: int
    steps: int
    device: torch.device
    num_classes: int = 1000
    seed: int = 0
    compile_backend: str = "inductor"
    skip: dict = field(default_factory=dict)   # impl label -> reason to skip
    channels_last: bool = True                 # the run's memory format


def run_config(cfg: Config, bar=None, state: Optional[dict] = None, inputs=None) -> list:
    """Time every implementation of `cfg`; one result dict per implementation."""
    device = cfg.device
    state = state if state is not None else initial_state(cfg.model, cfg.num_classes, cfg.seed)
    x, y = inputs if inputs is not None else make_inputs(cfg.batch, cfg.resolution,
                                                         cfg.num_classes, cfg.seed, device)
    results = []
    for label in cfg.impls:
        spec = plan_impl(label, cfg.dtype, cfg.channels_last)
        res = dict(impl=label, dtype=spec.dtype, layout=spec.layout,
                   description=spec.describe(), status="ok", note="", img_per_s=None,
                   peak_mem_gib=None, step_ms=None, warmup_s=None, backend=None,
                   ops_per_step=None, syncs_per_step=None, host_ms_per_step=None)
        reason = cfg.skip.get(label) or spec.skip
        if reason is None and (spec.graphs or spec.compile_mode == "reduce-overhead") \
                and device.type != "cuda":
            reason = "needs CUDA"
        if reason is None and spec.fused:
            res["backend"], reason = backend_status(spec.backend, device)
            if res["backend"] is not None:
                res["description"] += f" -> {res['backend']}"
        if reason is None and spec.amp_dtype is not None and device.type == "cuda" \
                and spec.amp_dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            reason = "this GPU does not support bf16"
        if reason is not None:
            res.update(status="unavailable", note=f"unavailable: {reason}")
            results.append(res)
            if bar is not None:
                bar.update(cfg.warmup + cfg.steps)
            continue
        if bar is not None:
            bar.set_description(f"{cfg.model} {cfg.mode} {label}")
        model = step = None
        try:
            free_memory(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            with backend_context(spec):
                model = build_model(spec, cfg.model, cfg.num_classes, state, device)
                step = make_step(spec, model, cfg.mode, x, y, cfg.compile_backend)
                seconds, warm, host = time_steps(step, cfg.warmup, cfg.steps, device, bar)
                res["ops_per_step"], res["syncs_per_step"] = count_dispatched(step, spec)
            res["img_per_s"] = cfg.batch * cfg.steps / seconds
            res["step_ms"] = 1000.0 * seconds / cfg.steps
            res["host_ms_per_step"] = 1000.0 * host / cfg.steps
            res["warmup_s"] = warm
            if device.type == "cuda":
                res["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        except torch.cuda.OutOfMemoryError as err:  # a result, not a bug
            res.update(status="unavailable",
                       note=f"unavailable: out of memory at batch {cfg.batch} "
                            f"({_first_line(err)[:80]})")
        except Exception as err:  # noqa: BLE001  (report it and go on with the others)
            res.update(status="failed", note=f"failed: {_first_line(err)[:200]}")
            traceback.print_exc(file=sys.stderr)
        finally:
            del model, step
            if spec.compile_mode is not None:
                torch._dynamo.reset()
            free_memory(device)
        results.append(res)
    _add_ratios(results)
    return results


def _add_ratios(results: list) -> None:
    ok = [r for r in results if r["img_per_s"]]
    base = next((r for r in ok if r["impl"].split("@")[0] == "eager"), ok[0] if ok else None)
    for r in results:
        r["ratio_to"] = base["impl"] if base else None
        r["ratio"] = r["img_per_s"] / base["img_per_s"] if base and r["img_per_s"] else None


# --- output ---------------------------------------------------------------------------------

def _device_label(env: dict) -> str:
    return f"{env['device']} ({env['device_name']})" if env.get("device_name") else env["device"]


def run_title(cfg: Config, env: dict) -> str:
    return (f"{cfg.model} {cfg.mode}, batch {cfg.batch}, {cfg.resolution}x{cfg.resolution}, "
            f"{_device_label(env)}, {cfg.warmup} warm-up + {cfg.steps} timed steps")


def format_results(cfg: Config, results: list, env: dict) -> str:
    base = results[0]["ratio_to"] if results else None
    ratio_head = f"vs {base}" if base else "ratio"
    rows = []
    for r in results:
        rows.append([r["impl"], r["dtype"], r["layout"], r["img_per_s"],
                     f"{r['ratio']:.2f}x" if r["ratio"] else "-",
                     r["peak_mem_gib"], r["step_ms"], r["host_ms_per_step"], r["ops_per_step"],
                     r["note"] or r["description"]])
    table = report.format_table(
        ["impl", "dtype", "layout", "img/s", ratio_head, "peak GiB", "ms/step", "host ms",
         "ops/step", "notes"], rows, align="lllrrrrrrl")
    lines = [run_title(cfg, env), table]
    if cfg.device.type != "cuda":
        lines.append(f"peak GiB: {PEAK_MEM_FOOTNOTE_CPU}")
    return "\n".join(lines)


def rows_for_json(cfg: Config, results: list) -> list:
    return [dict(model=cfg.model, mode=cfg.mode, dtype=r["dtype"], layout=r["layout"],
                 batch=cfg.batch, resolution=cfg.resolution, impl=r["impl"],
                 img_per_s=r["img_per_s"], peak_mem_gib=r["peak_mem_gib"],
                 step_ms=r["step_ms"], host_ms_per_step=r["host_ms_per_step"],
                 ops_per_step=r["ops_per_step"], syncs_per_step=r["syncs_per_step"])
            for r in results]


def result_document(runs: list, env: dict, settings: dict) -> dict:
    """The JSON file: {device, torch, triton, date, rows, ...extra top-level keys}."""
    doc = {"device": env["device"], "torch": env["torch"], "triton": env["triton"],
           "date": env["date"], "rows": []}
    details = []
    for cfg, results in runs:
        doc["rows"].extend(rows_for_json(cfg, results))
        for r in results:
            details.append(dict(model=cfg.model, mode=cfg.mode, batch=cfg.batch, impl=r["impl"],
                                status=r["status"], note=r["note"], setup=r["description"],
                                backend=r["backend"], ratio=r["ratio"], ratio_to=r["ratio_to"],
                                step_ms=r["step_ms"], warmup_s=r["warmup_s"]))
    doc.update(torchvision=env["torchvision"], python=env["python"],
               command=report.command_line(), device_name=env["device_name"],
               environment=env, settings=settings, details=details)
    if env["device"] != "cuda":
        doc["footnotes"] = {"peak_mem_gib": PEAK_MEM_FOOTNOTE_CPU}
    return doc


def plot(path: Path, runs: list, env: dict) -> Optional[Path]:
    groups = []
    for cfg, results in runs:
        base = results[0]["ratio_to"] if results else None
        groups.append(dict(
            title=f"{cfg.model} {cfg.mode}, batch {cfg.batch}, {cfg.resolution}px",
            labels=[f"{r['impl']}\n({r['dtype']})" for r in results],
            values=[r["img_per_s"] for r in results],
            notes=[(f"{r['ratio']:.2f}x" if r["ratio"] else r["status"]) for r in results]))
    cfg = runs[0][0]
    base = runs[0][1][0]["ratio_to"] if runs and runs[0][1] else None
    title = (f"fused_resnet bench: {_device_label(env)}, torch {env['torch']}"
             + (f" (ratios vs {base})" if base else ""))
    foot = (f"--dtype {cfg.dtype}, {cfg.warmup} warm-up + {cfg.steps} timed steps, "
            f"torchvision {env['torchvision']}, {env['date']}; bar labels: img/s and ratio")
    return report.bar_chart(path, groups, title, ylabel="images / s", footnote=foot)


def resolve_out(out: str, default_name: str) -> Path:
    if out == AUTO_OUT:
        return report.DEFAULT_RESULTS_DIR / default_name
    path = Path(out)
    if out.endswith(("/", os.sep)) or path.is_dir():
        return path / default_name
    if str(path.parent) in ("", "."):
        path = report.DEFAULT_RESULTS_DIR / path
    if path.suffix.lower() != ".json":
        path = path.with_name(path.name + ".json")
    return path


def write_outputs(json_path: Path, runs: list, env: dict, settings: dict) -> tuple:
    report.write_json(json_path, result_document(runs, env, settings))
    png = plot(json_path.with_suffix(".png"), runs, env)
    return json_path, png


# --- the subcommand -------------------------------------------------------------------------

def _defaults(args, device: torch.device) -> dict:
    base = GPU_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS
    pick = lambda key, val: base[key] if val is None else val  # noqa: E731
    return dict(models=pick("model", args.model) if args.model else [base["model"]],
                batches=args.batch or [base["batch"]],
                mode=pick("mode", args.mode), dtype=pick("dtype", args.dtype),
                resolution=pick("resolution", args.resolution),
                impls=args.impl or impl_list(base["impl"]),
                warmup=pick("warmup", args.warmup), steps=pick("steps", args.steps))


def _device(args, parser) -> torch.device:
    name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available on this machine (torch "
                     f"{torch.__version__}, cuda {torch.version.cuda})")
    return torch.device(name)


def run(args) -> int:
    parser = getattr(args, "_parser", None) or argparse.ArgumentParser()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.suite:
        return run_suite(args, parser)
    if args.tiny:
        report.note("--tiny only applies to --suite; ignored")
    device = _device(args, parser)
    if args.out is not None:
        problem = unwritable(resolve_out(args.out, "bench.json").parent)
        if problem:
            parser.error(f"--out {args.out!r}: cannot write there: {problem}")
    d = _defaults(args, device)
    modes = ("train", "infer") if d["mode"] == "both" else (d["mode"],)
    configs = [(m, b) for m in d["models"] for b in d["batches"]]
    if args.out not in (None, AUTO_OUT) and len(configs) > 1 and not (
            args.out.endswith(("/", os.sep)) or Path(args.out).is_dir()):
        parser.error("several models or batch sizes write several files: give --out a "
                     "directory (or no value)")
    env = report.environment(device)
    total = len(configs) * len(modes) * len(d["impls"]) * (d["warmup"] + d["steps"])
    all_ok, any_unavailable, written = True, False, []
    with report.progress(total, desc="bench", disable=args.no_progress) as bar:
        for model, batch in configs:
            state = initial_state(model, args.num_classes, args.seed)
            inputs = make_inputs(batch, d["resolution"], args.num_classes, args.seed, device)
            runs = []
            for mode in modes:
                cfg = Config(model, mode, batch, d["dtype"], d["resolution"], d["impls"],
                             d["warmup"], d["steps"], device, args.num_classes, args.seed,
                             args.compile_backend,
                             channels_last=args.memory_format == "channels_last")
                results = run_config(cfg, bar, state, inputs)
                runs.append((cfg, results))
                report.emit(bar, format_results(cfg, results, env) + "\n")
                all_ok &= all(r["status"] != "failed" for r in results)
                any_unavailable |= any(r["status"] == "unavailable" for r in results)
            if args.out is not None:
                mode_name = d["mode"]
                name = f"bench_{model}_{mode_name}_{device.type}.json" if len(configs) == 1 \
                    else f"bench_{model}_{mode_name}_b{batch}_{device.type}.json"
                settings = _settings(d, args, device)
                json_path, png = write_outputs(resolve_out(args.out, name), runs, env, settings)
                written += [json_path] + ([png] if png else [])
    for path in written:
        print(f"wrote {path}")
    if not all_ok:
        print("FAILED: at least one implementation raised an error (traceback above)",
              file=sys.stderr)
        return 1
    if args.strict and any_unavailable:
        print("--strict: at least one requested implementation is unavailable", file=sys.stderr)
        return 1
    return 0


def _settings(d: dict, args, device: torch.device) -> dict:
    return dict(warmup=d["warmup"], steps=d["steps"], seed=args.seed, num_classes=args.num_classes,
                optimizer="SGD(lr=0.01, momentum=0.9, weight_decay=1e-4)",
                loss="cross_entropy", compile_backend=args.compile_backend,
                timing="CUDA events after warm-up" if device.type == "cuda"
                else "time.perf_counter after warm-up",
                memory_format=args.memory_format,
                impls={label: plan_impl(label, d["dtype"],
                                        args.memory_format == "channels_last").describe()
                       for label in d["impls"]})


# --- the GPU suite --------------------------------------------------------------------------

def run_suite(args, parser) -> int:
    suite = SUITE_TINY if args.tiny else SUITE_GPU
    if args.tiny:
        device = torch.device(args.device or "cpu")
        if device.type == "cuda" and not torch.cuda.is_available():
            parser.error("--device cuda: CUDA is not available on this machine")
    else:
        device = _device(args, parser)
        if device.type != "cuda":
            report.note("--suite gpu without a GPU: running it on CPU will take hours; "
                        "use --tiny to try the code path")
    models = args.model or list(suite["models"])
    batches = args.batch or list(suite["batches"])
    modes = list(suite["modes"]) if args.mode in (None, "both") else [args.mode]
    dtype = args.dtype or suite["dtype"]
    resolution = args.resolution or suite["resolution"]
    warmup = suite["warmup"] if args.warmup is None else args.warmup
    steps = args.steps or suite["steps"]
    impls = args.impl or list(suite["impls"]) + available_fused_impls(device)
    skip = {}
    if args.tiny and device.type == "cpu":
        for label in impls:
            if label.startswith("compile"):
                skip[label] = ("skipped in --tiny mode on CPU (torch.compile takes minutes per "
                               "model on CPU); runs in the GPU suite")
    out_dir = Path(args.out) if args.out not in (None, AUTO_OUT) else report.DEFAULT_RESULTS_DIR
    if out_dir.suffix.lower() == ".json":
        parser.error("--suite writes several files: give --out a directory")
    problem = unwritable(out_dir)
    if problem:
        parser.error(f"--out {str(out_dir)!r}: cannot write there: {problem}")
    tag = f"{device.type}" + ("_tiny" if args.tiny else "")
    env = report.environment(device)
    plan = [(m, b, mode) for m in models for b in batches for mode in modes]
    if args.skip_existing:
        plan = [p for p in plan
                if not (out_dir / f"bench_{p[0]}_{p[2]}_b{p[1]}_{tag}.json").exists()]
    total = len(plan) * len(impls) * (warmup + steps)
    print(f"suite: {len(plan)} runs x {len(impls)} implementations on {_device_label(env)} "
          f"-> {out_dir}/", flush=True)
    all_runs, written, all_ok = [], [], True
    d = dict(warmup=warmup, steps=steps, dtype=dtype, impls=impls)
    with report.progress(total, desc="suite", disable=args.no_progress) as bar:
        for model, batch, mode in plan:
            cfg = Config(model, mode, batch, dtype, resolution, impls, warmup, steps, device,
                         args.num_classes, args.seed, args.compile_backend, skip,
                         channels_last=args.memory_format == "channels_last")
            results = run_config(cfg, bar)
            all_ok &= all(r["status"] != "failed" for r in results)
            report.emit(bar, format_results(cfg, results, env) + "\n")
            json_path = out_dir / f"bench_{model}_{mode}_b{batch}_{tag}.json"
            written += [p for p in write_outputs(json_path, [(cfg, results)], env,
                                                 _settings(d, args, device)) if p]
            all_runs.append((cfg, results))
    if all_runs:
        summary_json = out_dir / f"suite_{tag}.json"
        report.write_json(summary_json, result_document(all_runs, env, _settings(d, args, device)))
        summary_md = report.write_text(out_dir / f"suite_{tag}.md",
                                       suite_markdown(all_runs, env))
        written += [summary_json, summary_md]
    for path in written:
        print(f"wrote {path}")
    return 0 if all_ok else 1


def suite_markdown(runs: list, env: dict) -> str:
    lines = [f"# fused_resnet benchmark suite: {_device_label(env)}", "",
             f"torch {env['torch']}, torchvision {env['torchvision']}, triton {env['triton']}, "
             f"python {env['python']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}; {env['date']}.",
             "img/s: images per second (higher is better); ratio: against eager (torchvision "
             "at the run's dtype and layout) of the same run, or against its first "
             "implementation when eager is not in it; peak GiB: "
             "torch.cuda.max_memory_allocated (null on CPU); host ms: the main thread's CPU "
             "time per step; ops/step: dispatched ops per step.", ""]
    for cfg, results in runs:
        lines += [f"## {cfg.model} {cfg.mode}, batch {cfg.batch}, "
                  f"{cfg.resolution}x{cfg.resolution}", ""]
        rows = [[r["impl"], r["dtype"], r["layout"], r["img_per_s"],
                 f"{r['ratio']:.2f}x" if r["ratio"] else "-", r["peak_mem_gib"],
                 r["host_ms_per_step"], r["ops_per_step"], r["note"] or r["description"]]
                for r in results]
        lines += [report.markdown_table(["impl", "dtype", "layout", "img/s", "ratio", "peak GiB",
                                         "host ms", "ops/step", "notes"], rows), ""]
    return "\n".join(lines)
