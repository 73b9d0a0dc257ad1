"""Check that a fused model computes what torchvision computes, from the same weights.

Both models start from the same randomised weights (batch-norm affine parameters and
running statistics included, so that BN is not the identity) and see the same batch.
Compared, in train mode and in eval mode: the logits, the loss, the input gradient,
every parameter gradient (max and median relative error, worst parameter) and, after
the training step's forward, the running statistics. Relative error: ||a-b|| / ||b||.

  --dtype fp64   torchvision fp64 is the reference; pass when every error <= 1e-8
  --dtype fp32|bf16|fp16
                 both models run in that precision (bf16/fp16: fp32 weights under
                 autocast) and torchvision in fp64 is the reference: pass when
                 fused-vs-fp64 <= 2 x torchvision-vs-fp64 + a small floor

Exit code 0 on PASS, 1 on FAIL (2 for bad arguments).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

import fused_resnet

from . import report
from .arguments import MODELS, positive_int, unwritable
from .bench import backend_status, torchvision_model

CHECK_DTYPES = ("fp64", "fp32", "bf16", "fp16")
FP64_TOL = 1e-8
# Absolute floor added to 2x torchvision's own error: a few units of rounding of the dtype,
# for quantities that torchvision happens to get almost exactly right.
FLOOR = {"fp32": 1e-6, "bf16": 8e-3, "fp16": 1e-3}
CPU_DEFAULTS = dict(dtype="fp64", batch=2, resolution=64)
# Lower precision needs a better-conditioned problem: with batch 2 at 64x64 the last stage's
# batch norm sees 8 values per channel and amplifies rounding chaotically.
CPU_LOW_DEFAULTS = dict(batch=4, resolution=128)
GPU_DEFAULTS = dict(dtype="bf16", batch=8, resolution=224)
# Quantities reported but not gated in lower precision: a single scalar whose error is a
# projection of the output's, so a ratio of two such errors is noise.
NOT_GATED = ("loss",)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=MODELS, default="resnet50", metavar="NAME",
                        help=f"one of: {', '.join(MODELS)} (default resnet50)")
    parser.add_argument("--dtype", choices=CHECK_DTYPES, default=None,
                        help="fp64 (default on CPU) or a lower precision checked against a "
                             "torchvision fp64 reference (default on CUDA: bf16)")
    parser.add_argument("--batch", type=positive_int, default=None,
                        help="batch size, >= 2 (default on CPU 2 in fp64, 4 otherwise; 8 on "
                             "CUDA)")
    parser.add_argument("--resolution", type=positive_int, default=None, metavar="R",
                        help="input height and width (default on CPU 64 in fp64, 128 otherwise; "
                             "224 on CUDA)")
    parser.add_argument("--backend", default="auto",
                        choices=("auto", "reference", "cpu", "cuda", "triton"),
                        help="fused_resnet backend (default auto)")
    parser.add_argument("--channels-last", action="store_true",
                        help="run both models and the input in channels_last")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: cuda when available, else cpu")
    parser.add_argument("--num-classes", type=positive_int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tol", type=float, default=None,
                        help=f"fp64 tolerance (default {FP64_TOL:g})")
    parser.add_argument("--floor", type=float, default=None,
                        help="lower precision: absolute floor added to 2x torchvision's error "
                             f"(default {FLOOR})")
    parser.add_argument("--trials", type=positive_int, default=None,
                        help="independent random batches; errors are the median over them "
                             "(default 1 in fp64, 3 in lower precision, where one ReLU mask "
                             "flip at a near-zero activation can move a batch's gradients by "
                             "1e-2)")
    parser.add_argument("--json", default=None, metavar="PATH", help="write the report as JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


# --- the models and one step ----------------------------------------------------------------

def randomise_batch_norm(model: nn.Module, seed: int) -> None:
    """BN affine parameters and running statistics away from (1, 0, 0, 1)."""
    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                if m.weight is not None:
                    m.weight.copy_(torch.empty(n).uniform_(0.5, 1.5, generator=g))
                    m.bias.copy_(torch.randn(n, generator=g) * 0.2)
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                    m.running_var.copy_(torch.empty(n).uniform_(0.5, 2.0, generator=g))
                    m.num_batches_tracked.fill_(3)


@dataclass
class Variant:
    name: str                          # "fused", "torchvision", "torchvision fp64"
    model: nn.Module
    param_dtype: torch.dtype
    amp_dtype: Optional[torch.dtype]
    channels_last: bool
    backend: Optional[str] = None


def _run(variant: Variant, state: dict, x: torch.Tensor, y: torch.Tensor, train: bool) -> dict:
    """One forward + loss + backward from `state`; what is compared."""
    model = variant.model
    model.load_state_dict(state)
    model.train(train)
    model.zero_grad(set_to_none=True)
    fmt = torch.channels_last if variant.channels_last else torch.contiguous_format
    xin = x.detach().to(variant.param_dtype, memory_format=fmt, copy=True).requires_grad_(True)
    amp = (torch.autocast(x.device.type, dtype=variant.amp_dtype) if variant.amp_dtype
           else contextlib.nullcontext())
    backend = contextlib.nullcontext()
    if variant.backend is not None:
        backend = fused_resnet.use_backend(variant.backend)
    with backend:
        with amp:
            out = model(xin)
        acc = torch.float64 if out.dtype == torch.float64 else torch.float32
        loss = F.cross_entropy(out.to(acc), y)
        loss.backward()
    def keep(t):  # a copy: the live tensors are overwritten by the next phase
        return t.detach().to("cpu", torch.float64, copy=True)

    res = {"output": keep(out), "loss": keep(loss), "input gradient": keep(xin.grad),
           "grads": {n: keep(p.grad) if p.grad is not None else None
                     for n, p in model.named_parameters()}}
    if train:
        res["stats"] = {n: keep(b) for n, b in model.named_buffers()
                        if n.endswith(("running_mean", "running_var"))}
        res["counts"] = {n: int(b) for n, b in model.named_buffers()
                         if n.endswith("num_batches_tracked")}
    return res


def rel_err(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> float:
    """||a - b|| / ||b|| in float64 (the absolute difference when b is zero)."""
    if a is None or b is None:
        return 0.0 if a is None and b is None else float("inf")
    a, b = a.double(), b.double()
    if a.shape != b.shape:
        return float("inf")
    diff = (a - b).norm().item()
    denom = b.norm().item()
    if not (diff == diff):  # NaN
        return float("inf")
    return diff / denom if denom > 0 else diff


def _summary(errors: dict) -> dict:
    if not errors:
        return dict(n=0, max=0.0, median=0.0, worst=None)
    worst = max(errors, key=lambda k: errors[k])
    return dict(n=len(errors), max=errors[worst], median=statistics.median(errors.values()),
                worst=worst if errors[worst] > 0 else None)


def _load(ef: dict, et: dict, floor: float) -> float:
    """How far fused's error is towards its limit (2 x torchvision's + floor); > 1 fails."""
    load = ef["max"] / (2 * et["max"] + floor) if ef["max"] > 0 else 0.0
    if ef.get("median") is not None and et.get("median") is not None:
        load = max(load, ef["median"] / (2 * et["median"] + floor))
    return load


def pick_trial(rows: list, floor: Optional[float]) -> tuple:
    """rows: one (fused vs ref, torchvision vs ref or None, fused vs torchvision or None)
    per trial (independent batch) for one quantity. fp64 (floor None): the worst trial.
    Lower precision: the trial of median load. A ReLU mask flip at a near-zero activation
    is a rare rounding event of one batch, in either model; a real disagreement shows in
    every batch."""
    if floor is None:
        return max(rows, key=lambda r: r[0]["max"])
    ordered = sorted(rows, key=lambda r: _load(r[0], r[1], floor))
    return ordered[(len(ordered) - 1) // 2]


def _worse(a: dict, b: dict) -> dict:
    """Per quantity, the larger max and the larger median of two comparisons."""
    out = {}
    for q in a:
        out[q] = dict(a[q])
        for key in ("max", "median"):
            if a[q][key] is not None and b[q][key] is not None:
                out[q][key] = max(a[q][key], b[q][key])
    return out


def compare(a: dict, b: dict) -> dict:
    """Errors of result `a` against result `b`, per quantity."""
    out = {}
    for q in ("output", "loss", "input gradient"):
        out[q] = dict(n=1, max=rel_err(a[q], b[q]), median=None, worst=None)
    out["parameter gradients"] = _summary({n: rel_err(a["grads"][n], b["grads"][n])
                                           for n in b["grads"]})
    if "stats" in b:
        out["running statistics"] = _summary({n: rel_err(a["stats"][n], b["stats"][n])
                                              for n in b["stats"]})
        bad = [n for n in b["counts"] if a["counts"].get(n) != b["counts"][n]]
        out["num_batches_tracked"] = dict(n=len(b["counts"]), max=float(len(bad)), median=None,
                                          worst=bad[0] if bad else None, mismatches=len(bad))
    return out


# --- the subcommand, step by step ----------------------------------------------------------

PHASES = ("train", "eval")


@dataclass
class Settings:
    """What is checked: the arguments with their defaults filled in, validated."""
    device: torch.device
    dtype: str                        # one of CHECK_DTYPES
    batch: int
    resolution: int
    backend_resolved: str             # what --backend resolves to on `device`
    trials: int
    tol: float                        # fp64: the tolerance
    floor: float                      # lower precision: the absolute floor of the limit

    @property
    def low(self) -> bool:
        """Lower precision: checked against torchvision in fp64."""
        return self.dtype != "fp64"

    @property
    def work_dtype(self) -> torch.dtype:
        return torch.float64 if self.dtype == "fp64" else torch.float32

    @property
    def amp(self) -> Optional[torch.dtype]:
        return report.DTYPES[self.dtype] if self.dtype in ("bf16", "fp16") else None


def resolve_settings(args, parser: argparse.ArgumentParser) -> Settings:
    """The device's defaults for what the arguments leave open; a usage error (exit 2) for
    what cannot be checked."""
    name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available on this machine")
    device = torch.device(name)
    if args.json:
        problem = unwritable(Path(args.json).absolute().parent)
        if problem:
            parser.error(f"--json {args.json!r}: cannot write there: {problem}")
    defaults = GPU_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS
    dtype = args.dtype or defaults["dtype"]
    if device.type == "cpu" and dtype != "fp64":
        defaults = dict(defaults, **CPU_LOW_DEFAULTS)
    batch = args.batch or defaults["batch"]
    resolution = args.resolution or defaults["resolution"]
    if batch < 2:
        parser.error("--batch must be >= 2: batch norm in train mode needs more than one "
                     "value per channel")
    if resolution < 32:
        parser.error(f"--resolution must be >= 32 for a ResNet (5 stride-2 stages), got "
                     f"{resolution}")
    resolved, why = backend_status(args.backend, device)
    if why is not None:
        parser.error(f"--backend {args.backend}: unavailable on {device.type}: {why}")
    low = dtype != "fp64"
    return Settings(device, dtype, batch, resolution, resolved,
                    trials=args.trials or (3 if low else 1),
                    tol=args.tol if args.tol is not None else FP64_TOL,
                    floor=args.floor if args.floor is not None else FLOOR.get(dtype, 0.0))


def initial_model(args) -> tuple:
    """(torchvision model, a copy of its state_dict): seeded weights, batch norm randomised."""
    torch.manual_seed(args.seed)
    base = torchvision_model(args.model, args.num_classes)
    randomise_batch_norm(base, args.seed)
    return base, {k: v.detach().clone() for k, v in base.state_dict().items()}


def make_batches(args, s: Settings) -> list:
    """One (input, labels) batch per trial, each from its own seed."""
    batches = []
    for t in range(s.trials):
        g = torch.Generator().manual_seed(args.seed + 1 + 1000 * t)
        batches.append((torch.randn(s.batch, 3, s.resolution, s.resolution,
                                    generator=g).to(s.device),
                        torch.randint(0, args.num_classes, (s.batch,), generator=g).to(s.device)))
    return batches


def make_variants(base: nn.Module, args, s: Settings) -> list:
    """The models compared, copies of `base`: fused and torchvision in the checked
    precision; in lower precision also torchvision in fp64 (the reference) and torchvision
    in the other memory layout."""
    def place(model, dt, cl):
        model = model.to(device=s.device, dtype=dt)
        return model.to(memory_format=torch.channels_last) if cl else model

    cl = args.channels_last
    variants = [
        Variant("fused", place(fused_resnet.convert(copy.deepcopy(base)), s.work_dtype, cl),
                s.work_dtype, s.amp, cl, backend=args.backend),
        Variant("torchvision", place(copy.deepcopy(base), s.work_dtype, cl), s.work_dtype,
                s.amp, cl),
    ]
    if s.low:
        variants.append(Variant("torchvision fp64", place(copy.deepcopy(base), torch.float64,
                                                          False), torch.float64, None, False))
        # torchvision's own rounding error, measured twice (NCHW and channels_last round
        # differently): gradients through ReLU are discontinuous, and one mask flip at a
        # near-zero activation moves them by far more than the dtype's precision. Taking the
        # worse of two legitimate torchvision runs makes "2 x torchvision's error" less of a
        # lottery on small problems.
        variants.append(Variant("torchvision other layout",
                                place(copy.deepcopy(base), s.work_dtype, not cl), s.work_dtype,
                                s.amp, not cl))
    return variants


def states_by_dtype(state: dict, variants: list, device: torch.device) -> dict:
    """{parameter dtype: the initial state_dict on `device` in it} for the variants' dtypes."""
    return {dt: {k: (v.to(device=device, dtype=dt) if v.is_floating_point() else v.to(device))
                 for k, v in state.items()}
            for dt in dict.fromkeys(v.param_dtype for v in variants)}


def compare_variants(res: dict, low: bool) -> tuple:
    """One trial's comparisons: (fused vs reference, torchvision vs reference, fused vs
    torchvision); in fp64 torchvision is the reference and the last two are None."""
    if not low:
        return compare(res["fused"], res["torchvision"]), None, None
    ref = res["torchvision fp64"]
    et = _worse(compare(res["torchvision"], ref), compare(res["torchvision other layout"], ref))
    return compare(res["fused"], ref), et, compare(res["fused"], res["torchvision"])


def run_trials(variants: list, states: dict, batches: list, low: bool,
               no_progress: bool) -> dict:
    """Every variant on every batch in train and eval mode: {phase: [compare_variants of
    each trial]}."""
    trials = len(batches)
    per_trial = {phase: [] for phase in PHASES}
    with report.progress(trials * len(PHASES) * len(variants), desc="check",
                         disable=no_progress) as bar:
        for t, (x, y) in enumerate(batches):
            for phase in PHASES:
                res = {}
                for v in variants:
                    bar.set_description(f"check {phase} {v.name}"
                                        + (f" (batch {t + 1}/{trials})" if trials > 1 else ""))
                    res[v.name] = _run(v, states[v.param_dtype], x, y, phase == "train")
                    bar.update(1)
                per_trial[phase].append(compare_variants(res, low))
                del res
    return per_trial


def gate_fp64(per_trial: dict, tol: float) -> list:
    """fp64: one check per phase and quantity, the worst trial's error against `tol`
    (num_batches_tracked: no mismatch)."""
    checks = []
    for phase in PHASES:
        errs = {q: pick_trial([(tr[0][q], None, None) for tr in per_trial[phase]], None)[0]
                for q in per_trial[phase][0][0]}
        for q, e in errs.items():
            ok = e["max"] <= (0 if q == "num_batches_tracked" else tol)
            checks.append(dict(phase=phase, quantity=q, n=e["n"], fused_vs_ref=e["max"],
                               median=e["median"], worst=e["worst"],
                               limit=0 if q == "num_batches_tracked" else tol, passed=ok))
    return checks


def gate_low_precision(per_trial: dict, floor: float) -> list:
    """Lower precision: one check per phase and quantity, the trial of median load; fused's
    error (max and median) within 2 x torchvision's + floor (NOT_GATED: reported only;
    num_batches_tracked: no mismatch in any trial)."""
    checks = []
    for phase in PHASES:
        ef, et, eft = {}, {}, {}
        for q in per_trial[phase][0][0]:
            rows = [(tr[0][q], tr[1][q], tr[2][q]) for tr in per_trial[phase]]
            if q == "num_batches_tracked":  # any mismatch in any batch fails
                ef[q], et[q], eft[q] = max(rows, key=lambda r: r[0]["max"])
            else:
                ef[q], et[q], eft[q] = pick_trial(rows, floor)
        for q in ef:
            if q == "num_batches_tracked":
                ok = ef[q]["max"] == 0
                checks.append(dict(phase=phase, quantity=q, n=ef[q]["n"],
                                   fused_vs_ref=ef[q]["max"], torchvision_vs_ref=et[q]["max"],
                                   ratio=None, fused_vs_torchvision=eft[q]["max"],
                                   median=None, worst=ef[q]["worst"], limit=0, passed=ok))
                continue
            limit = 2 * et[q]["max"] + floor
            ok = ef[q]["max"] <= limit
            if ef[q]["median"] is not None:
                ok = ok and ef[q]["median"] <= 2 * et[q]["median"] + floor
            if q in NOT_GATED:
                ok, limit = True, None
            ratio = ef[q]["max"] / et[q]["max"] if et[q]["max"] > 0 else None
            checks.append(dict(phase=phase, quantity=q, n=ef[q]["n"],
                               fused_vs_ref=ef[q]["max"], torchvision_vs_ref=et[q]["max"],
                               ratio=ratio, fused_vs_torchvision=eft[q]["max"],
                               median=ef[q]["median"], torchvision_median=et[q]["median"],
                               worst=ef[q]["worst"], limit=limit, passed=ok))
    return checks


def report_title(args, s: Settings, env: dict) -> str:
    return (f"check {args.model}: fused_resnet (backend {args.backend} -> {s.backend_resolved}) "
            f"vs torchvision, {s.dtype}{' autocast' if s.amp else ''}, batch {s.batch}, "
            f"{s.resolution}x{s.resolution}, "
            f"{'channels_last' if args.channels_last else 'NCHW'}, "
            f"{env['device']} ({env['device_name']})"
            + (f", {s.trials} batches ({'worst' if not s.low else 'median'} one reported)"
               if s.trials > 1 else ""))


def print_fp64_table(checks: list, tol: float) -> str:
    """Print the fp64 table; return the verdict's numbers."""
    headers = ["phase", "quantity", "n", "rel err max", "median", "worst", "limit", ""]
    rows = [[c["phase"], c["quantity"], str(c["n"]), c["fused_vs_ref"], c["median"],
             c["worst"] or "", c["limit"], "ok" if c["passed"] else "FAIL"] for c in checks]
    print("relative error ||fused - torchvision|| / ||torchvision||, both in fp64 "
          "(num_batches_tracked: number of mismatching counters)")
    print(report.format_table(headers, rows, align="llrrrlrl"))
    return (f"max relative error {max(c['fused_vs_ref'] for c in checks):.3g} "
            f"(tolerance {tol:g})")


def print_low_precision_table(checks: list, floor: float) -> str:
    """Print the lower-precision table; return the verdict's numbers."""
    headers = ["phase", "quantity", "n", "fused vs fp64", "torchvision vs fp64", "ratio",
               "fused vs tv", "fused median", "tv median", "worst (fused)", "limit", ""]
    rows = [[c["phase"], c["quantity"], str(c["n"]), c["fused_vs_ref"],
             c["torchvision_vs_ref"], f"{c['ratio']:.2f}" if c["ratio"] else "-",
             c["fused_vs_torchvision"], c["median"], c.get("torchvision_median"),
             c["worst"] or "", c["limit"],
             ("ok" if c["passed"] else "FAIL") if c["limit"] is not None else "(info)"]
            for c in checks]
    print(f"relative error against torchvision in fp64 (max over tensors; torchvision: the "
          f"worse of its NCHW and channels_last runs; limit = 2 x torchvision's error + "
          f"{floor:g}, medians checked the same way)")
    print(report.format_table(headers, rows, align="llrrrrrrrlrl"))
    worst = max((c for c in checks if c["limit"] is not None), key=lambda c: (c["ratio"] or 0))
    return (f"worst ratio fused/torchvision error {worst['ratio'] or 0:.2f} "
            f"({worst['phase']} {worst['quantity']})")


def print_verdict(checks: list, verdict: str, seconds: float) -> None:
    failures = [c for c in checks if not c["passed"]]
    if not failures:
        print(f"PASS: fused_resnet agrees with torchvision: {verdict}; {seconds:.1f} s")
        return
    what = "; ".join(f"{c['phase']} {c['quantity']} {c['fused_vs_ref']:.3g} > "
                     f"{c['limit']:.3g}" + (f" (worst {c['worst']})" if c["worst"] else "")
                     for c in failures)
    print(f"FAIL: fused_resnet disagrees with torchvision: {what}; {seconds:.1f} s")


def write_json_report(path: str, args, s: Settings, env: dict, checks: list, passed: bool,
                      seconds: float) -> Path:
    doc = dict(env, command=report.command_line(), model=args.model, dtype=s.dtype,
               autocast=bool(s.amp), batch=s.batch, resolution=s.resolution,
               backend=args.backend, backend_resolved=s.backend_resolved,
               channels_last=args.channels_last, seed=args.seed, trials=s.trials,
               reference="torchvision fp64" if s.low else "torchvision (same dtype)",
               metric="||a-b|| / ||b||",
               tolerance=dict(fp64=s.tol) if not s.low else dict(factor=2.0, floor=s.floor),
               tf32=dict(matmul=torch.backends.cuda.matmul.allow_tf32,
                         cudnn=torch.backends.cudnn.allow_tf32),
               passed=passed, seconds=seconds, checks=checks)
    return report.write_json(path, doc)


def run(args) -> int:
    parser = getattr(args, "_parser", None) or argparse.ArgumentParser()
    s = resolve_settings(args, parser)
    t0 = time.perf_counter()
    env = report.environment(s.device)
    base, state = initial_model(args)
    batches = make_batches(args, s)
    variants = make_variants(base, args, s)
    del base
    per_trial = run_trials(variants, states_by_dtype(state, variants, s.device), batches, s.low,
                           args.no_progress)
    checks = gate_low_precision(per_trial, s.floor) if s.low else gate_fp64(per_trial, s.tol)
    passed = all(c["passed"] for c in checks)
    seconds = time.perf_counter() - t0

    print(report_title(args, s, env))
    verdict = (print_low_precision_table(checks, s.floor) if s.low
               else print_fp64_table(checks, s.tol))
    print_verdict(checks, verdict, seconds)
    if args.json:
        print(f"wrote {write_json_report(args.json, args, s, env, checks, passed, seconds)}")
    sys.stdout.flush()
    return 0 if passed else 1
