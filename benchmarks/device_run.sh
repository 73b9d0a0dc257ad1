#!/usr/bin/env bash
# One prepared run that proves and measures everything GPU-side on a bare H200 machine
# (16 cores, preinstalled torch, no network), in under 9 minutes. The stages, in order of
# value, each with its own time limit (`timeout`); a stage may also use what the earlier
# ones left over, as long as the later stages keep their budgets:
#
#   stage         what (estimate on the H200)                              budget real / --dry-run
#   1 setup       FUSED_RESNET_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 bash run.sh setup
#                 against the preinstalled torch, then: CUDA kernels registered, triton
#                 usable (~1.5-2 min: 6 .cu + 9 .cpp files in parallel, the slowest .cu
#                 ~90 s)                                                        140 s / 45 s
#   2 correctness pytest: CUDA primitives (incl. the >2^31-element test), finish steps,
#                 option A, ResNet-50/152 bf16 vs fp32 on the cuda backend (~3300 small
#                 tests, ~45 s); `check` ResNet-50 + ResNet-152 bf16 on the cuda backend
#                 (~15 s each); the Triton kernel/backend GPU tests, CUDA-graph capture,
#                 host syncs (~40 s, mostly Triton compiles); `check` on the triton
#                 backend (~20 s each)                                          130 s / 65 s
#   3 sanitize    compute-sanitizer memcheck + racecheck of benchmarks/sanitize_primitives.py
#                 (every primitive on small tensors; ~20 s each, mostly torch's start
#                 under the tool); SKIP when the tool refuses the device        45 s / 30 s
#   4 bn_ops      benchmarks/bench_bn_ops.py: BN primitives vs eager, GB/s (~25 s)  35 s / 15 s
#   5 triton_conv benchmarks/bench_triton_conv.py one shape at a time (rows survive a
#                 timeout): the 23 distinct ResNet-50 convs, batch 256, with a short fixed
#                 autotune list (DEVICE_RUN_TRITON_CONFIGS=short: 2 configs per kernel;
#                 ~1 min, mostly compiles)                                      60 s / 15 s
#   6 bench       python -m fused_resnet bench, batch 256, 224x224, bf16, channels_last,
#                 3 warm-up + 10 timed steps, resnet50 train, resnet152 train, resnet50
#                 infer, resnet152 infer, each as two processes (eager-cl-amp, fused,
#                 fused-cuda, fused-triton, eager-graphs, fused-graphs; then compile,
#                 compile-graphs) so that a timeout keeps what was measured. torch.compile
#                 costs ~40-90 s per model and mode cold: a background bench of the compile
#                 rows (DEVICE_RUN_PREWARM=1) fills inductor's caches during stages 2-3.
#                 ~2 min per model and mode: the time left decides how far it gets  85 s / 50 s
#   7 profile     benchmarks/profile_step.py: one profiled training step per model (~30 s) 40 s / 45 s
#                                         deadline (budgets + 5 s to pack): 540 s / 270 s
#
# usage: benchmarks/device_run.sh [--dry-run]     run (results in $OUT)
#        benchmarks/device_run.sh --unpack ARCHIVE [DEST]   unpack device_run.tar.gz into
#                                                 DEST (default benchmarks/results/)
#   --dry-run: the same stages on a CPU machine at toy size (GPU tests skip, the sanitizer
#   stage runs the script on CPU tensors without the tool, GPU benches report 'skipped',
#   bench resnet18 32x32 batch 2, 1 + 1 steps; profile_step --tiny), in ~2-3 minutes.
#
# Results: $OUT (default benchmarks/results/device_<UTC date>/) gets four files:
#   device_run.tar.gz   everything: per-stage logs, bench/check/profile/bn/triton JSON,
#                       pytest junit XML, env.json, summary.md/.json, in one folder
#                       device_<UTC date>/ (so `--unpack` puts it in benchmarks/results/)
#   summary.md, summary.json   device, versions, date, each stage's status/seconds/budget
#                       and the headline numbers (img/s per impl, fused/eager-cl-amp,
#                       fused/compile, peak-memory ratio, ...); rewritten after each stage
#   device_run.log      the whole console output
# Environment: OUT, PYTHON (default: python3 when it has torch+torchvision, else .venv),
#   STAGES="setup correctness ..." (a subset; the others are reported SKIP),
#   BUDGET_<STAGE>=seconds (e.g. BUDGET_BENCH=200), DEADLINE_S, BENCH_JOBS="resnet50:train ...",
#   BENCH_IMPLS (one process per model x mode with these), BENCH_WARMUP, BENCH_STEPS,
#   PROFILE_IMPLS, DEVICE_RUN_PREWARM=0|1, DEVICE_RUN_TRITON_CONFIGS=short|all,
#   DEVICE_RUN_KEEP=1 (keep the work folder), DEVICE_RUN_DRY_TRITON=compile-only.
# Exit status: 0 when every stage passed or was a legitimate SKIP, else the number of
# failed stages (2 for a usage error, before any stage).
set -u
ORIG_PWD=$PWD
SELF=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")
cd "$(dirname "$SELF")/.."
ROOT=$PWD
abspath() { case "$1" in /*) echo "$1" ;; *) echo "$ORIG_PWD/$1" ;; esac; }

# ------------------------------------------------------------------ arguments
DRY=0
case "${1:-}" in
  --dry-run) DRY=1; shift ;;
  --unpack)
    archive=${2:+$(abspath "$2")}; dest=${3:+$(abspath "$3")}; dest=${dest:-$ROOT/benchmarks/results}
    if [ -z "$archive" ] || [ ! -f "$archive" ]; then
      echo "usage: benchmarks/device_run.sh --unpack ARCHIVE [DEST]  (no file '$archive')" >&2
      exit 2
    fi
    top=$(tar -tzf "$archive" | head -n 1 | cut -d/ -f1)
    mkdir -p "$dest" && tar -xzf "$archive" -C "$dest" || exit 1
    echo "unpacked $archive into $dest/$top"
    [ -f "$dest/$top/summary.md" ] && echo "summary: $dest/$top/summary.md"
    exit 0 ;;
  -h|--help) sed -n '2,/^set -u/p' "$SELF" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
  "") ;;
  *) echo "device_run.sh: unknown argument '$1' (expected --dry-run, --unpack ARCHIVE, --help)" >&2
     exit 2 ;;
esac
[ $# -gt 0 ] && { echo "device_run.sh: unexpected arguments: $*" >&2; exit 2; }

STAMP=$(date -u +%Y%m%dT%H%MZ)
if [ "$DRY" = 1 ]; then NAME=device_dryrun_$STAMP; else NAME=device_$STAMP; fi
if [ -n "${OUT:-}" ]; then OUT=$(abspath "$OUT"); else OUT=$ROOT/benchmarks/results/$NAME; fi
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
TMP_ROOT=$(mktemp -d "${TMPDIR:-/tmp}/device_run.XXXXXX") || exit 2
WORK=$TMP_ROOT/$NAME
mkdir -p "$WORK"/{logs,bench,check,pytest,sanitize,profile,prewarm}
LOG=$OUT/device_run.log
: > "$LOG"
HELPER=$WORK/device_run_helpers.py

# the interpreter: run.sh's rule (python3 when it has torch and torchvision, else .venv)
if [ -z "${PYTHON:-}" ]; then
  if python3 -c "import torch, torchvision" >/dev/null 2>&1; then PYTHON=python3
  elif [ -x .venv/bin/python ]; then PYTHON=$ROOT/.venv/bin/python
  else PYTHON=python3; fi
fi
PY=$PYTHON
export PYTHONUNBUFFERED=1

STAGE_NAMES=(setup correctness sanitize bn_ops triton_conv bench profile)
if [ "$DRY" = 1 ]; then
  declare -A BUDGET=([setup]=45 [correctness]=65 [sanitize]=30 [bn_ops]=15 [triton_conv]=15
                     [bench]=50 [profile]=45)
  DEADLINE_S=${DEADLINE_S:-270}
  BENCH_JOBS=${BENCH_JOBS:-"resnet18:train resnet18:infer"}
  BENCH_GROUPS=${BENCH_IMPLS:+all:$BENCH_IMPLS}
  BENCH_GROUPS=${BENCH_GROUPS:-all:eager,fused,fused-graphs}
  BENCH_WARMUP=${BENCH_WARMUP:-1}; BENCH_STEPS=${BENCH_STEPS:-1}
  PREWARM=${DEVICE_RUN_PREWARM:-0}
else
  declare -A BUDGET=([setup]=140 [correctness]=130 [sanitize]=45 [bn_ops]=35 [triton_conv]=60
                     [bench]=85 [profile]=40)
  DEADLINE_S=${DEADLINE_S:-540}
  BENCH_JOBS=${BENCH_JOBS:-"resnet50:train resnet152:train resnet50:infer resnet152:infer"}
  # each model x mode runs as two processes, so that a timeout keeps the rows already
  # measured: the fast implementations first, then the two torch.compile ones
  BENCH_GROUPS=${BENCH_IMPLS:+all:$BENCH_IMPLS}
  BENCH_GROUPS=${BENCH_GROUPS:-main:eager-cl-amp,fused,fused-cuda,fused-triton,eager-graphs,fused-graphs compile:compile,compile-graphs}
  BENCH_WARMUP=${BENCH_WARMUP:-3}; BENCH_STEPS=${BENCH_STEPS:-10}
  PREWARM=${DEVICE_RUN_PREWARM:-1}
  PROFILE_IMPLS=${PROFILE_IMPLS:-eager-cl-amp,fused}
  # the GPU run: compiled Triton kernels (never the interpreter), caches shared by the
  # stages (Triton kernels and autotune timings, inductor graphs) on this machine's disk
  unset TRITON_INTERPRET
  export TRITON_CACHE_AUTOTUNING=1 TORCHINDUCTOR_FX_GRAPH_CACHE=1 TORCHINDUCTOR_AUTOGRAD_CACHE=1
fi
BENCH_IMPLS=$(for g in $BENCH_GROUPS; do printf '%s,' "${g#*:}"; done | sed 's/,$//')
PACK_RESERVE=5
MIN_STEP=5
for s in "${STAGE_NAMES[@]}"; do
  var=BUDGET_${s^^}
  [ -n "${!var:-}" ] && BUDGET[$s]=${!var}
done
STAGES=${STAGES:-${STAGE_NAMES[*]}}
export DEVICE_RUN_TRITON_CONFIGS=${DEVICE_RUN_TRITON_CONFIGS:-short}
T_START=$(date +%s)
T_DEADLINE=$((T_START + DEADLINE_S))
STAGES_TSV=$WORK/stages.tsv
: > "$STAGES_TSV"
FAILED=0
PREWARM_PID=

# ------------------------------------------------------------------ the helpers (Python)
cat > "$HELPER" <<'PYEOF'
"""Helpers of benchmarks/device_run.sh (written by it into its work folder each run).

  run [-m MODULE | SCRIPT] ARGS...  run a module or script after trimming the Triton conv
                                    autotune lists (DEVICE_RUN_TRITON_CONFIGS=short, GPU only)
  triton-conv ARGS...               benchmarks/bench_triton_conv.py one shape at a time, the
                                    rows merged into --out after each shape
  env PATH                          the machine and versions as JSON
  summary WORK OUT DRY              summary.md + summary.json from the work folder
"""
import glob
import json
import os
import re
import runpy
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

ROOT = os.getcwd()
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) kept of fused_resnet/kernels/conv.py's lists
SHORT = {"_conv_fwd_kernel": [(128, 128, 64, 8, 3), (128, 64, 64, 4, 4)],
         "_conv_dgrad_kernel": [(128, 128, 64, 8, 3), (128, 64, 64, 4, 4)],
         "_conv_wgrad_kernel": [(128, 128, 64, 8, 3), (64, 64, 64, 4, 4)]}


def short_triton():
    """Trim the autotune lists of the Triton convs in this process; what was done."""
    if os.environ.get("DEVICE_RUN_TRITON_CONFIGS", "short") == "all":
        return "all configs"
    import torch
    if not torch.cuda.is_available():
        return "not trimmed (no CUDA: the interpreter runs one config)"
    try:
        import fused_resnet.kernels as kernels
        if not kernels.AVAILABLE:
            return f"not trimmed (kernels unavailable: {kernels.IMPORT_ERROR})"
        conv = kernels.conv
    except Exception as err:  # noqa: BLE001
        return f"not trimmed ({type(err).__name__}: {err})"
    done = []
    for name, keep in SHORT.items():
        tuner = getattr(conv, name, None)
        if tuner is None or not hasattr(tuner, "configs"):
            continue
        sig = lambda c: (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"],  # noqa
                         c.num_warps, c.num_stages)
        sel = [c for c in tuner.configs if sig(c) in keep] or list(tuner.configs[:2])
        tuner.configs = sel
        done.append(f"{name.strip('_')}: " + ", ".join("%dx%dx%d w%d s%d" % sig(c) for c in sel))
    return "; ".join(done)


def cmd_run(argv):
    print(f"[device_run] triton autotune: {short_triton()}", flush=True)
    if argv and argv[0] == "-m":
        sys.argv = [argv[1]] + argv[2:]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(argv)
        sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))
        runpy.run_path(argv[0], run_name="__main__")
    return 0


def cmd_triton_conv(argv):
    import importlib.util
    trimmed = short_triton()
    print(f"[device_run] triton autotune: {trimmed}", flush=True)
    path = os.path.join(ROOT, "benchmarks", "bench_triton_conv.py")
    spec = importlib.util.spec_from_file_location("bench_triton_conv", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    import torch
    out = None
    rest = list(argv)
    if "--out" in rest:
        i = rest.index("--out")
        out = rest[i + 1]
        del rest[i:i + 2]
    if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1" \
            or "--compile-only" in rest or out is None:
        rc = mod.main(rest + (["--out", out] if out else []))
        if not torch.cuda.is_available() and "--compile-only" not in rest:
            print("SKIP: no CUDA device", flush=True)
        return rc
    shapes = mod.RESNET50_CONVS
    names = [mod.op_name(*c) for c in shapes]
    rows, doc, errors = [], None, 0
    t0 = time.time()
    for i, name in enumerate(names):
        part = f"{out}.part{i}.json"
        rc = mod.main(rest + ["--only", f"^{name}$", "--out", part])
        if rc != 0:
            print(f"[device_run] {name}: bench_triton_conv exited {rc}", flush=True)
            errors += 1
            continue
        with open(part) as f:
            d = json.load(f)
        os.remove(part)
        rows += d["rows"]
        doc = d
        errors += sum(1 for r in d["rows"] if "error" in r)
        doc.update(rows=rows, shapes_done=i + 1, shapes_total=len(names), triton_configs=trimmed,
                   seconds=round(time.time() - t0, 1))
        with open(out + ".tmp", "w") as f:
            json.dump(doc, f, indent=1)
        os.replace(out + ".tmp", out)
    print(f"[device_run] triton conv: {len(names)} shapes, {len(rows)} rows, {errors} errors, "
          f"{time.time() - t0:.0f} s; wrote {out}", flush=True)
    return 1 if errors else 0


def _run_text(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception:  # noqa: BLE001
        return None


def cmd_env(argv):
    import torch
    env = {}
    try:
        from fused_resnet.tools import report
        env = report.environment("cuda" if torch.cuda.is_available() else "cpu")
    except Exception as err:  # noqa: BLE001
        env = {"error": f"{type(err).__name__}: {err}", "torch": torch.__version__,
               "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(gpu_capability=f"sm_{p.major}{p.minor}", gpu_sms=p.multi_processor_count,
                   gpu_memory_gib=round(p.total_memory / 2**30, 1))
    smi = _run_text(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                     "--format=csv,noheader"])
    nvcc = _run_text(["nvcc", "--version"])
    san = _run_text(["compute-sanitizer", "--version"])
    env.update(nvidia_smi=smi, nvcc=nvcc.splitlines()[-1] if nvcc else None,
               compute_sanitizer=san.splitlines()[-1] if san else None,
               cpu_count=os.cpu_count(), git_commit=_run_text(["git", "rev-parse", "HEAD"]),
               git_dirty=bool(_run_text(["git", "status", "--porcelain", "--untracked-files=no"])))
    try:
        import fused_resnet.kernels as kernels
        env["triton_kernels"] = "available" if kernels.AVAILABLE else str(kernels.IMPORT_ERROR)
    except Exception as err:  # noqa: BLE001
        env["triton_kernels"] = f"{type(err).__name__}: {err}"
    env["cuda_kernels"] = torch._C._dispatch_has_kernel_for_dispatch_key(
        "fused_resnet::bn_stats", "CUDA")
    with open(argv[0], "w") as f:
        json.dump(env, f, indent=1)
    for k in ("device_name", "torch", "triton", "torchvision", "cuda", "cudnn", "python",
              "gpu_capability", "nvidia_smi", "nvcc", "compute_sanitizer",
              "fused_resnet_backends", "triton_kernels", "cuda_kernels", "git_commit"):
        print(f"  {k:22s} {env.get(k)}")
    return 0


# ------------------------------------------------------------------ summary

def _load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except Exception:  # noqa: BLE001
        return None


def _fmt(v, nd=1):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def _ratio(a, b):
    return a / b if a and b else None


def _table(headers, rows):
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(_fmt(c, 2) if isinstance(c, float) else str(c) for c in r) + " |"
            for r in rows]
    return out


def bench_summary(work):
    runs = []
    by_mm, files = {}, {}
    for path in sorted(glob.glob(os.path.join(work, "bench", "*.json")), key=os.path.getmtime):
        doc = _load(path)
        if not doc:
            continue
        details = {(d.get("model"), d.get("mode"), d.get("batch"), d.get("impl")): d
                   for d in doc.get("details", [])}
        for row in doc.get("rows", []):
            key = (row["model"], row["mode"], row["batch"], row["resolution"], row["dtype"])
            det = details.get((row["model"], row["mode"], row["batch"], row["impl"]), {})
            r = dict(row)
            r["status"], r["note"] = det.get("status"), det.get("note")
            by_mm.setdefault(key, {})[row["impl"]] = r
            files.setdefault(key, [])
            if os.path.basename(path) not in files[key]:
                files[key].append(os.path.basename(path))
    if True:
        for (model, mode, batch, res, dtype), impls in by_mm.items():
            def ips(label):
                r = impls.get(label)
                return r and r.get("img_per_s")

            def mem(label):
                r = impls.get(label)
                return r and r.get("peak_mem_gib")
            base = "eager-cl-amp" if ips("eager-cl-amp") else "eager"
            fused_labels = [k for k in impls if k.split("@")[0].startswith("fused") and ips(k)]
            best = max(fused_labels, key=ips) if fused_labels else None
            runs.append(dict(
                files=files[(model, mode, batch, res, dtype)], model=model, mode=mode, batch=batch,
                resolution=res, dtype=dtype, baseline=base,
                img_per_s={k: ips(k) for k in impls},
                peak_mem_gib={k: mem(k) for k in impls},
                notes={k: r.get("note") for k, r in impls.items() if r.get("status") != "ok"},
                fused_vs_baseline=_ratio(ips("fused"), ips(base)),
                fused_vs_compile=_ratio(ips("fused"), ips("compile")),
                fused_graphs_vs_compile_graphs=_ratio(ips("fused-graphs"), ips("compile-graphs")),
                best_fused=best, best_fused_vs_baseline=_ratio(ips(best), ips(base)),
                best_fused_vs_compile=_ratio(ips(best), ips("compile")),
                peak_mem_fused_vs_baseline=_ratio(mem("fused"), mem(base))))
    return runs


def pytest_summary(work):
    out = {}
    for path in sorted(glob.glob(os.path.join(work, "pytest", "*.xml"))):
        try:
            root = ET.parse(path).getroot()
        except Exception:  # noqa: BLE001
            continue
        suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
        agg = {k: 0 for k in ("tests", "failures", "errors", "skipped")}
        secs = 0.0
        for s in suites:
            for k in agg:
                agg[k] += int(s.get(k, 0))
            secs += float(s.get("time", 0))
        agg["passed"] = agg["tests"] - agg["failures"] - agg["errors"] - agg["skipped"]
        agg["seconds"] = round(secs, 1)
        out[os.path.basename(path)[:-4]] = agg
    return out


def check_summary(work):
    res = []
    for path in sorted(glob.glob(os.path.join(work, "check", "*.json"))):
        d = _load(path)
        if d:
            res.append(dict(model=d.get("model"), dtype=d.get("dtype"),
                            backend=d.get("backend_resolved") or d.get("backend"),
                            device=d.get("device"), batch=d.get("batch"),
                            resolution=d.get("resolution"), passed=d.get("passed"),
                            seconds=round(d.get("seconds") or 0, 1)))
    return res


def bn_summary(work):
    d = _load(os.path.join(work, "bn_ops.json"))
    if not d:
        return None
    per = {}
    for r in d.get("rows", []):
        per.setdefault((r["op"], tuple(r["shape"])), {})[r["impl"]] = r
    ops = {}
    for (op, _), impls in per.items():
        fused = impls.get("fused_cuda")
        eager = [r for k, r in impls.items() if k != "fused_cuda"]
        if not fused:
            continue
        o = ops.setdefault(op, {"bw_fraction": [], "speedup": []})
        o["bw_fraction"].append(fused["bw_fraction"])
        if eager:
            o["speedup"].append(min(r["ms"] for r in eager) / fused["ms"])
    return dict(device=d.get("device"), copy_gbps=d.get("copy_gbps"),
                checks_failed=sum(1 for c in d.get("checks", []) if not c.get("ok")),
                ops={op: dict(median_bw_fraction=statistics.median(v["bw_fraction"]),
                              median_speedup_vs_eager=(statistics.median(v["speedup"])
                                                       if v["speedup"] else None),
                              shapes=len(v["bw_fraction"]))
                     for op, v in ops.items()})


def triton_summary(work):
    d = _load(os.path.join(work, "triton_conv.json"))
    if not d:
        return None
    per = {}
    errors = 0
    for r in d.get("rows", []):
        if "error" in r:
            errors += 1
            continue
        per.setdefault(r["impl"], []).append(r)
    return dict(device=d.get("device"), shapes_done=d.get("shapes_done"),
                shapes_total=d.get("shapes_total"), triton_configs=d.get("triton_configs"),
                errors=errors,
                impls={k: dict(rows=len(v), median_speedup_vs_cudnn=statistics.median(
                    r["speedup_vs_cudnn"] for r in v if r.get("speedup_vs_cudnn") is not None)
                    if any(r.get("speedup_vs_cudnn") is not None for r in v) else None,
                    median_tflops=statistics.median(r["tflops"] for r in v))
                       for k, v in per.items()})


def profile_summary(work):
    res = []
    for path in sorted(glob.glob(os.path.join(work, "profile", "profile_*.json"))):
        d = _load(path)
        for e in (d or {}).get("entries", []):
            cats = e.get("categories") or {}
            res.append(dict(model=e["model"], impl=e["impl"], status=e["status"],
                            note=e.get("note"), step_ms=e.get("step_ms"),
                            total_ms=e.get("total_ms"), kernels=e.get("kernels"),
                            pct={c: v.get("pct") for c, v in cats.items()}))
    return res


def cmd_summary(argv):
    work, out, dry = argv[0], argv[1], argv[2] == "1"
    stages = []
    with open(os.path.join(work, "stages.tsv")) as f:
        for line in f:
            p = line.rstrip("\n").split("\t")
            if len(p) >= 7:
                stages.append(dict(num=int(p[0]), name=p[1], status=p[2], seconds=int(p[3]),
                                   budget=int(p[4]), limit=int(p[5]), note=p[6]))
    env = _load(os.path.join(work, "env.json")) or {}
    meta = _load(os.path.join(work, "meta.json")) or {}
    doc = dict(mode="dry-run" if dry else "device", date=meta.get("date"),
               device=env.get("device_name"), torch=env.get("torch"), triton=env.get("triton"),
               torchvision=env.get("torchvision"), cuda=env.get("cuda"), cudnn=env.get("cudnn"),
               python=env.get("python"), nvidia_smi=env.get("nvidia_smi"),
               git_commit=env.get("git_commit"), meta=meta, stages=stages,
               failed_stages=sum(1 for s in stages if s["status"] == "FAIL"),
               bench=bench_summary(work), pytest=pytest_summary(work),
               check=check_summary(work), bn_ops=bn_summary(work),
               triton_conv=triton_summary(work), profile=profile_summary(work))
    L = [f"# fused_resnet device run, {doc['date']} ({doc['mode']})", ""]
    L += _table(["what", "value"], [
        ["device", f"{doc['device']} ({env.get('gpu_capability', '-')}, "
                   f"{env.get('gpu_sms', '-')} SMs, {env.get('gpu_memory_gib', '-')} GiB)"
         if env.get("gpu_capability") else str(doc["device"])],
        ["torch / torchvision / triton", f"{doc['torch']} / {doc['torchvision']} / {doc['triton']}"],
        ["CUDA / cuDNN / driver", f"{doc['cuda']} / {doc['cudnn']} / {doc['nvidia_smi'] or '-'}"],
        ["python, CPUs", f"{doc['python']}, {env.get('cpu_count')}"],
        ["nvcc / compute-sanitizer", f"{env.get('nvcc') or '-'} / {env.get('compute_sanitizer') or '-'}"],
        ["commit", f"{doc['git_commit'] or '-'}{' (+ local changes)' if env.get('git_dirty') else ''}"],
        ["elapsed", f"{meta.get('elapsed_s', '-')} s of a {meta.get('deadline_s', '-')} s deadline"],
        ["triton autotune", os.environ.get("DEVICE_RUN_TRITON_CONFIGS", "short")
         + " (bench_triton_conv, fused-triton rows, Triton tests)"],
    ])
    L += ["", "## Stages", ""]
    L += _table(["#", "stage", "status", "seconds", "budget", "limit", "notes"],
                [[s["num"], s["name"], s["status"], s["seconds"], s["budget"], s["limit"],
                  s["note"] or ""] for s in stages])
    L += ["", "(limit: the budget plus what earlier stages left over, within the deadline)"]
    if doc["bench"]:
        labels = []
        for r in doc["bench"]:
            labels += [k for k in r["img_per_s"] if k not in labels]
        L += ["", "## Throughput (img/s; python -m fused_resnet bench)", ""]
        rows = []
        for r in doc["bench"]:
            rows.append([r["model"], r["mode"], r["batch"], r["resolution"], r["dtype"]]
                        + [_fmt(r["img_per_s"].get(k)) for k in labels]
                        + [_fmt(r["fused_vs_baseline"], 2) + f" ({r['baseline']})",
                           _fmt(r["fused_vs_compile"], 2),
                           f"{_fmt(r['best_fused_vs_baseline'], 2)} ({r['best_fused'] or '-'})",
                           _fmt(r["fused_graphs_vs_compile_graphs"], 2),
                           _fmt(r["peak_mem_fused_vs_baseline"], 2)])
        L += _table(["model", "mode", "batch", "res", "dtype"] + labels
                    + ["fused / baseline", "fused / compile", "best fused / baseline",
                       "fused-graphs / compile-graphs", "peak mem fused / baseline"], rows)
        notes = [f"- {r['model']} {r['mode']} {k}: {v}" for r in doc["bench"]
                 for k, v in r["notes"].items()]
        if notes:
            L += [""] + notes
    L += ["", "## Correctness", ""]
    for name, p in doc["pytest"].items():
        L.append(f"- pytest {name}: {p['passed']} passed, {p['failures']} failed, "
                 f"{p['errors']} errors, {p['skipped']} skipped ({p['seconds']} s)")
    for c in doc["check"]:
        L.append(f"- check {c['model']} {c['dtype']} backend {c['backend']} on {c['device']} "
                 f"(batch {c['batch']}, {c['resolution']}px): "
                 f"{'PASS' if c['passed'] else 'FAIL'} ({c['seconds']} s)")
    for path in sorted(glob.glob(os.path.join(work, "sanitize", "*.json"))):
        d = _load(path)
        if d:
            L.append(f"- sanitize_primitives {os.path.basename(path)[:-5]} on {d['device']}: "
                     f"{len(d['cases'])} checks, {d['failed']} failed ({d['seconds']:.1f} s)")
    bn = doc["bn_ops"]
    if bn:
        L += ["", f"## BN primitives (bench_bn_ops.py; copy bandwidth {bn['copy_gbps']} GB/s, "
                  f"{bn['checks_failed']} agreement checks failed)", ""]
        L += _table(["op", "shapes", "median bw fraction (fused_cuda)", "median speedup vs eager"],
                    [[op, v["shapes"], _fmt(v["median_bw_fraction"], 2),
                      _fmt(v["median_speedup_vs_eager"], 2)] for op, v in bn["ops"].items()])
    tc = doc["triton_conv"]
    if tc:
        L += ["", f"## Triton convolutions (bench_triton_conv.py; {tc['shapes_done']}/"
                  f"{tc['shapes_total']} shapes, {tc['errors']} errors)", ""]
        L += _table(["impl", "rows", "median speedup vs its cuDNN baseline", "median TFLOP/s"],
                    [[k, v["rows"], _fmt(v["median_speedup_vs_cudnn"], 2),
                      _fmt(v["median_tflops"], 1)] for k, v in tc["impls"].items()])
    if doc["profile"]:
        cats = []
        for e in doc["profile"]:
            cats += [c for c in e["pct"] if c not in cats]
        L += ["", "## One profiled training step (profile_step.py)", ""]
        L += _table(["model", "impl", "step ms", "profiled total ms", "kernels/ops"]
                    + [f"{c} %" for c in cats],
                    [[e["model"], e["impl"], _fmt(e["step_ms"]), _fmt(e["total_ms"]),
                      _fmt(e["kernels"])] + [_fmt(e["pct"].get(c), 0) for c in cats]
                     if e["status"] == "ok" else
                     [e["model"], e["impl"], "-", "-", "-"] + ["-"] * len(cats)
                     for e in doc["profile"]])
        bad = [f"- {e['model']} {e['impl']}: {e['note']}" for e in doc["profile"]
               if e["status"] != "ok"]
        L += ([""] + bad) if bad else []
    L += ["", f"Files: device_run.tar.gz (unpack: benchmarks/device_run.sh --unpack "
              f"device_run.tar.gz), summary.md, summary.json, device_run.log.", ""]
    text = "\n".join(L)
    for d in (work, out):
        with open(os.path.join(d, "summary.md"), "w") as f:
            f.write(text)
        with open(os.path.join(d, "summary.json"), "w") as f:
            json.dump(doc, f, indent=1)
    return 0


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    fn = {"run": cmd_run, "triton-conv": cmd_triton_conv, "env": cmd_env,
          "summary": cmd_summary}[cmd]
    sys.exit(fn(args))
PYEOF

# ------------------------------------------------------------------ logging and stages
say() { echo "$*" | tee -a "$LOG" ${STAGE_LOG:+"$STAGE_LOG"}; }
now() { date +%s; }
CMD_OUT=$WORK/logs/.last_command.out
CUR_PID=$WORK/logs/.current.pid
CUR_RC=$WORK/logs/.current.rc
STAGE_LOG=

stage_begin() {  # NUM NAME: start a stage. Its time limit: its budget, or more when the
  # earlier stages left time over (what the later stages' budgets do not need), never past
  # the deadline: the stages are in order of value, so the earlier ones get the spare time
  STAGE_NUM=$1; STAGE=$2
  local budget=${BUDGET[$STAGE]} t later=0 s seen=0 allowed
  t=$(now)
  for s in "${STAGE_NAMES[@]}"; do  # the budgets of the selected stages still to come
    if [ "$seen" = 1 ] && selected "$s"; then later=$((later + BUDGET[$s])); fi
    [ "$s" = "$STAGE" ] && seen=1
  done
  allowed=$budget
  local spare=$((T_DEADLINE - t - later - PACK_RESERVE))
  [ "$spare" -gt "$allowed" ] && allowed=$spare
  local left=$((T_DEADLINE - t - PACK_RESERVE))
  [ "$allowed" -gt "$left" ] && allowed=$left
  [ "$allowed" -lt 0 ] && allowed=0
  STAGE_ALLOWED=$allowed
  STAGE_T0=$t; STAGE_END=$((t + allowed))
  STAGE_LOG=$WORK/logs/${STAGE_NUM}_${STAGE}.log
  : > "$STAGE_LOG"
  STAGE_FAILS=0; STAGE_NOTE=""; STAGE_SKIP=""
  say ""
  say "=== stage $STAGE_NUM/7 $STAGE: up to ${allowed} s (budget ${budget} s), $(date -u +%H:%M:%S) UTC"
}

note() { STAGE_NOTE="${STAGE_NOTE:+$STAGE_NOTE; }$*"; }
fail() { STAGE_FAILS=$((STAGE_FAILS + 1)); note "$*"; say "device_run.sh: FAILED: $*"; }
skip() { STAGE_SKIP="$*"; note "$*"; say "device_run.sh: SKIP: $*"; }

RC=0
run() {  # [--no-count] LABEL CMD...: run with the stage's remaining time; log; count failure
  local count=1
  [ "$1" = "--no-count" ] && { count=0; shift; }
  local label=$1; shift
  local remaining=$((STAGE_END - $(now)))
  : > "$CMD_OUT"
  if [ "$remaining" -lt "$MIN_STEP" ]; then
    RC=124
    [ "$count" = 1 ] && fail "$label: not run (stage time spent)"
    return 124
  fi
  say "+ [$label, ≤${remaining}s] $*"
  local t0; t0=$(now)
  # timeout runs the command in a process group of its own (killed whole at the limit);
  # the pipeline runs in the background so that a signal to this script is handled at
  # once (on_signal kills that group too) instead of after the command
  rm -f "$CUR_PID" "$CUR_RC"
  ( timeout --kill-after=10 "$remaining" "$@" < /dev/null & echo $! > "$CUR_PID"
    wait $!; echo $? > "$CUR_RC" ) 2>&1 | tee -a "$CMD_OUT" "$STAGE_LOG" "$LOG" &
  wait $!
  RC=$(cat "$CUR_RC" 2>/dev/null || echo 143)
  rm -f "$CUR_PID"
  local dt=$(( $(now) - t0 ))
  if [ "$RC" = 124 ] || [ "$RC" = 137 ]; then
    say "device_run.sh: $label: timeout after ${dt} s"
    [ "$count" = 1 ] && fail "$label: timeout after ${dt} s"
  elif [ "$RC" != 0 ]; then
    say "device_run.sh: $label: exit $RC after ${dt} s"
    [ "$count" = 1 ] && fail "$label: exit $RC"
  else
    say "device_run.sh: $label: ok (${dt} s)"
  fi
  return "$RC"
}

pytest_tally() {  # the last "N passed, M skipped" line of the last command, for a note
  grep -E "[0-9]+ (passed|failed|skipped|error|deselected)" "$CMD_OUT" | tail -n 1 \
    | sed -e 's/=//g' -e 's/^ *//' -e 's/ *$//' -e 's/ in [0-9.]*s.*//'
}

stage_end() {
  local dt=$(( $(now) - STAGE_T0 )) status
  if [ "$STAGE_FAILS" -gt 0 ]; then status=FAIL; FAILED=$((FAILED + 1))
  elif [ -n "$STAGE_SKIP" ]; then status=SKIP
  else status=PASS; fi
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$STAGE_NUM" "$STAGE" "$status" "$dt" \
    "${BUDGET[$STAGE]}" "$STAGE_ALLOWED" \
    "$(printf '%s' "$STAGE_NOTE" | tr '\t\n|' '  /')" >> "$STAGES_TSV"
  say "=== stage $STAGE_NUM $STAGE: $status ($dt s of ${STAGE_ALLOWED} s)${STAGE_NOTE:+: $STAGE_NOTE}"
  STAGE_LOG=
  write_summary
}

selected() { case " $STAGES " in *" $1 "*) return 0 ;; esac; return 1; }

write_meta() {
  printf '{"date": "%s", "mode": "%s", "elapsed_s": %s, "deadline_s": %s, "python": "%s", "out": "%s", "archive_dir": "%s", "stages_selected": "%s", "bench_jobs": "%s", "bench_impls": "%s", "bench_warmup": %s, "bench_steps": %s, "prewarm": %s, "triton_configs": "%s"}\n' \
    "$(date -u -d "@$T_START" +%Y-%m-%dT%H:%M:%SZ)" "$([ "$DRY" = 1 ] && echo dry-run || echo device)" \
    "$(( $(now) - T_START ))" "$DEADLINE_S" "$PY" "$OUT" "$NAME" "$STAGES" "$BENCH_JOBS" \
    "$BENCH_IMPLS" "$BENCH_WARMUP" "$BENCH_STEPS" "$PREWARM" "$DEVICE_RUN_TRITON_CONFIGS" \
    > "$WORK/meta.json"
}

write_summary() {
  write_meta
  "$PY" "$HELPER" summary "$WORK" "$OUT" "$DRY" >> "$WORK/logs/summary.log" 2>&1 \
    || echo "device_run.sh: (summary failed, see logs/summary.log)" | tee -a "$LOG"
}

stop_prewarm() {
  [ -n "$PREWARM_PID" ] || return 0
  if kill -0 "$PREWARM_PID" 2>/dev/null; then
    say "device_run.sh: stopping the compile pre-warm (pid $PREWARM_PID)"
    kill -TERM -- "-$PREWARM_PID" 2>/dev/null
    for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$PREWARM_PID" 2>/dev/null || break; sleep 1; done
    kill -KILL -- "-$PREWARM_PID" 2>/dev/null
  fi
  wait "$PREWARM_PID" 2>/dev/null
  PREWARM_PID=
  say "device_run.sh: compile pre-warm: $(grep -c '^wrote .*json' "$WORK/logs/prewarm.log" 2>/dev/null) run(s) finished (logs/prewarm.log)"
}

pack() {
  stop_prewarm
  write_summary
  cp "$LOG" "$WORK/device_run.log" 2>/dev/null
  rm -f "$CMD_OUT" "$CUR_PID" "$CUR_RC"
  if tar -czf "$OUT/device_run.tar.gz.tmp" -C "$TMP_ROOT" "$NAME"; then
    mv "$OUT/device_run.tar.gz.tmp" "$OUT/device_run.tar.gz"
    local size; size=$(du -k "$OUT/device_run.tar.gz" | cut -f1)
    echo "device_run.sh: archive $OUT/device_run.tar.gz (${size} KiB, $(tar -tzf "$OUT/device_run.tar.gz" | wc -l) entries)" | tee -a "$LOG"
    [ "$size" -gt 15000 ] && echo "device_run.sh: WARNING: archive over 15 MiB" | tee -a "$LOG"
    [ "${DEVICE_RUN_KEEP:-0}" = 1 ] || rm -rf "$TMP_ROOT"
  else
    echo "device_run.sh: packing failed; the work folder stays in $WORK" | tee -a "$LOG"
  fi
}

on_signal() {
  trap - INT TERM
  if [ -s "$CUR_PID" ]; then   # the running command's process group
    kill -TERM -- "-$(cat "$CUR_PID")" 2>/dev/null; sleep 2
    kill -KILL -- "-$(cat "$CUR_PID")" 2>/dev/null
  fi
  say "device_run.sh: interrupted; packing what there is"
  [ -n "$STAGE_LOG" ] && { STAGE_FAILS=$((STAGE_FAILS + 1)); note "interrupted"; stage_end; }
  pack
  exit 130
}
trap on_signal INT TERM

skip_stage() {  # NUM NAME REASON: a stage that is not run
  stage_begin "$1" "$2"
  skip "$3"
  stage_end
}

# ------------------------------------------------------------------ the stages
say "device_run.sh: $([ "$DRY" = 1 ] && echo 'DRY RUN on this machine (CPU, toy sizes)' || echo 'device run')," \
    "python $PY, deadline ${DEADLINE_S} s, results in $OUT"
say "device_run.sh: stages: $STAGES; budgets: $(for s in "${STAGE_NAMES[@]}"; do printf '%s=%s ' "$s" "${BUDGET[$s]}"; done)"

GPU_OK=1   # the device run needs the GPU past set-up

stage_setup() {
  stage_begin 1 setup
  if [ "$DRY" = 1 ]; then
    # the same command; FUSED_RESNET_CUDA as CI sets it (.ci/run), so that an existing
    # build is recognised (the build stamp includes it) and the set-up is a no-op
    local cuda_flag=${FUSED_RESNET_CUDA:-}
    if [ -z "$cuda_flag" ]; then
      if command -v nvcc >/dev/null 2>&1 || [ -x /usr/local/cuda/bin/nvcc ]; then cuda_flag=1; else cuda_flag=auto; fi
    fi
    run "run.sh setup" env FUSED_RESNET_CUDA="$cuda_flag" TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=2 \
      PYTHON="$PY" bash run.sh setup
  else
    run "run.sh setup" env FUSED_RESNET_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 \
      PYTHON="$PY" bash run.sh setup
  fi
  local built; built=$(grep -o 'built in [0-9]* s' "$CMD_OUT" | tail -n 1)
  note "${built:-already built (no-op)}"
  run "environment" "$PY" "$HELPER" env "$WORK/env.json"
  if [ "$DRY" = 0 ]; then
    run "GPU build check" "$PY" -c "
import torch, fused_resnet, fused_resnet.kernels as k
assert torch.cuda.is_available(), 'no CUDA device'
assert torch._C._dispatch_has_kernel_for_dispatch_key('fused_resnet::bn_stats', 'CUDA'), 'no CUDA kernels in fused_resnet._C'
assert 'cuda' in fused_resnet.available_backends(), fused_resnet.available_backends()
assert 'triton' in fused_resnet.available_backends() and k.AVAILABLE, ('triton', k.IMPORT_ERROR)
print('GPU build ok:', torch.cuda.get_device_name(), fused_resnet.available_backends())" \
      || GPU_OK=0
  fi
  stage_end
}

start_prewarm() {  # torch.compile's caches (inductor graphs, autograd) filled in the background
  [ "$DRY" = 0 ] && [ "$PREWARM" = 1 ] && [ "$GPU_OK" = 1 ] && selected bench || return 0
  case ",$BENCH_IMPLS," in *,compile,*|*,compile-graphs,*) ;; *) return 0 ;; esac
  local impls
  impls=$(echo "$BENCH_IMPLS" | tr ',' '\n' | grep -E '^compile' | paste -sd, -)
  local script="for job in $BENCH_JOBS; do
    echo \"== prewarm \$job\"
    nice -n 5 '$PY' '$HELPER' run -m fused_resnet bench --model \"\${job%%:*}\" --mode \"\${job##*:}\" \
      --batch 256 --resolution 224 --dtype bf16 --memory-format channels_last --impl $impls \
      --warmup 0 --steps 1 --device cuda --no-progress --out '$WORK/prewarm/'
  done"
  setsid bash -c "$script" > "$WORK/logs/prewarm.log" 2>&1 < /dev/null &
  PREWARM_PID=$!
  say "device_run.sh: compile pre-warm started in the background (pid $PREWARM_PID, $impls; log logs/prewarm.log)"
}

stage_correctness() {
  stage_begin 2 correctness
  local k_cuda k_triton
  if [ "$DRY" = 1 ]; then
    k_cuda="cuda or gpu or (finish and cpu)"   # the GPU tests skip; the CPU finish steps run
    k_triton="(cuda or gpu) and not triton_step"   # the interpreted ResNet step takes minutes
  else
    k_cuda="cuda or gpu"
    k_triton="cuda or gpu or triton_step"
  fi
  run "pytest cuda" "$PY" -m pytest -p no:cacheprovider -q -rfEs --durations=10 \
    --junitxml="$WORK/pytest/cuda.xml" \
    tests/backends/test_cuda_primitives.py tests/backends/test_finish_steps.py \
    tests/ops/test_option_a.py tests/models/test_resnet.py -k "$k_cuda"
  note "pytest cuda: $(pytest_tally)"
  if [ "$DRY" = 1 ]; then
    run "check resnet18 fp64" "$PY" -m fused_resnet check --model resnet18 --resolution 32 \
      --batch 2 --device cpu --dtype fp64 --no-progress --json "$WORK/check/check_resnet18_fp64_cpu.json"
  else
    for model in resnet50 resnet152; do
      run "check $model cuda" "$PY" -m fused_resnet check --model "$model" --dtype bf16 \
        --backend cuda --channels-last --device cuda --no-progress \
        --json "$WORK/check/check_${model}_bf16_cuda.json"
    done
  fi
  run "pytest triton" "$PY" "$HELPER" run -m pytest -p no:cacheprovider -q -rfEs --durations=10 \
    --junitxml="$WORK/pytest/triton.xml" \
    tests/backends/test_triton_backend.py tests/kernels/test_triton_kernels.py \
    tests/tools/test_cuda_graphs.py tests/test_host_overhead.py -k "$k_triton"
  note "pytest triton: $(pytest_tally)"
  if [ "$DRY" = 0 ]; then
    for model in resnet50 resnet152; do
      run "check $model triton" "$PY" "$HELPER" run -m fused_resnet check --model "$model" \
        --dtype bf16 --backend triton --channels-last --device cuda --no-progress \
        --json "$WORK/check/check_${model}_bf16_triton.json"
    done
  fi
  note "check reports: $(ls "$WORK/check" | wc -l)"
  stage_end
}

stage_sanitize() {
  stage_begin 3 sanitize
  if [ "$DRY" = 1 ]; then
    run "primitives on CPU" "$PY" benchmarks/sanitize_primitives.py --device cpu \
      --json "$WORK/sanitize/cpu.json"
    note "no sanitizer in a dry run: $(grep -o '[0-9]* checks.*failed' "$CMD_OUT" | tail -n 1)"
    stage_end; return
  fi
  if ! command -v compute-sanitizer >/dev/null 2>&1; then
    skip "compute-sanitizer not found"; stage_end; return
  fi
  local tool extra opts
  for tool in memcheck racecheck; do
    if [ "$tool" = memcheck ]; then extra=(--dtypes bf16,fp32); else extra=(--quick --dtypes bf16); fi
    opts=(--tool "$tool" --error-exitcode 3 --print-limit 20 --report-api-errors no
          --kernel-name kns=fused_resnet)
    run --no-count "$tool" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer "${opts[@]}" \
      "$PY" benchmarks/sanitize_primitives.py --device cuda "${extra[@]}" \
      --json "$WORK/sanitize/$tool.json"
    if [ "$RC" != 0 ] && grep -qiE "unrecognized option|unknown option|invalid option|invalid value|not a valid" "$CMD_OUT"; then
      say "device_run.sh: $tool: retrying with the plain options"
      run --no-count "$tool" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer \
        --tool "$tool" --error-exitcode 3 "$PY" benchmarks/sanitize_primitives.py \
        --device cuda "${extra[@]}" --json "$WORK/sanitize/$tool.json"
    fi
    if [ "$RC" != 0 ] && grep -qiE "device not supported|not supported on|unsupported device|does not support" "$CMD_OUT"; then
      skip "compute-sanitizer refused the device: $(grep -iE 'not supported|unsupported|does not support' "$CMD_OUT" | head -n 1 | sed 's/^=* *//' | cut -c1-120)"
      break
    fi
    local tally
    tally=$(grep -hoE "(ERROR|RACECHECK) SUMMARY: .*" "$CMD_OUT" | tail -n 1)
    if [ "$RC" = 0 ]; then note "$tool: ${tally:-ok}"
    else fail "$tool: exit $RC${tally:+ ($tally)}"; fi
  done
  stage_end
}

stage_bn_ops() {
  stage_begin 4 bn_ops
  local flag=(); [ "$DRY" = 1 ] && flag=(--allow-no-gpu)
  run "bench_bn_ops" "$PY" benchmarks/bench_bn_ops.py --out "$WORK/bn_ops.json" ${flag[@]+"${flag[@]}"}
  if [ "$DRY" = 1 ] && grep -q "skipped: no CUDA device" "$CMD_OUT"; then
    skip "no CUDA device (--allow-no-gpu)"
  elif [ -f "$WORK/bn_ops.json" ]; then note "copy $(grep -o 'copy bandwidth: [0-9]* GB/s' "$CMD_OUT")"; fi
  stage_end
}

stage_triton_conv() {
  stage_begin 5 triton_conv
  if [ "$DRY" = 1 ]; then
    if [ "${DEVICE_RUN_DRY_TRITON:-allow-no-gpu}" = compile-only ]; then
      run "bench_triton_conv --compile-only" "$PY" "$HELPER" triton-conv --compile-only
    else
      run "bench_triton_conv" "$PY" "$HELPER" triton-conv --allow-no-gpu --out "$WORK/triton_conv.json"
      grep -q "^SKIP: no CUDA device" "$CMD_OUT" && skip "no CUDA device (--allow-no-gpu)"
    fi
  else
    run "bench_triton_conv" "$PY" "$HELPER" triton-conv --warmup 2 --reps 10 \
      --out "$WORK/triton_conv.json"
    note "$(grep -o 'triton conv: [0-9]* shapes, [0-9]* rows, [0-9]* errors' "$CMD_OUT" | tail -n 1)"
  fi
  stage_end
}

stage_bench() {
  stage_begin 6 bench
  local job model mode group gname impls dev done_jobs=0 total=0 size=()
  if [ "$DRY" = 1 ]; then dev=cpu; size=(--batch 2 --resolution 32 --dtype fp32)
  else dev=cuda; size=(--batch 256 --resolution 224 --dtype bf16); fi
  for job in $BENCH_JOBS; do for group in $BENCH_GROUPS; do total=$((total + 1)); done; done
  for job in $BENCH_JOBS; do
    model=${job%%:*}; mode=${job##*:}
    for group in $BENCH_GROUPS; do
      gname=${group%%:*}; impls=${group#*:}
      run "bench $model $mode $gname" "$PY" "$HELPER" run -m fused_resnet bench --model "$model" \
        --mode "$mode" "${size[@]}" --device "$dev" --memory-format channels_last \
        --impl "$impls" --warmup "$BENCH_WARMUP" --steps "$BENCH_STEPS" --no-progress \
        --out "$WORK/bench/bench_${model}_${mode}_${gname}_${dev}.json" \
        && done_jobs=$((done_jobs + 1))
    done
  done
  note "$done_jobs/$total bench runs ($BENCH_WARMUP warm-up + $BENCH_STEPS timed steps)"
  stage_end
}

stage_profile() {
  stage_begin 7 profile
  if [ "$DRY" = 1 ]; then
    run "profile_step --tiny" "$PY" benchmarks/profile_step.py --tiny --model resnet18 \
      --out-dir "$WORK/profile"
  else
    run "profile_step" "$PY" "$HELPER" run benchmarks/profile_step.py \
      --model resnet50,resnet152 --impl "$PROFILE_IMPLS" --batch 256 --resolution 224 \
      --dtype bf16 --warmup 2 --device cuda --out-dir "$WORK/profile"
  fi
  stage_end
}

num=0
for s in "${STAGE_NAMES[@]}"; do
  num=$((num + 1))
  [ "$s" = bn_ops ] && stop_prewarm   # the timing stages have the GPU to themselves
  if ! selected "$s"; then
    skip_stage "$num" "$s" "not selected (STAGES)"
  elif [ "$DRY" = 0 ] && [ "$GPU_OK" = 0 ] && [ "$s" != setup ]; then
    stage_begin "$num" "$s"; fail "not run: the GPU build check failed (stage 1)"; stage_end
  else
    "stage_$s"
  fi
  [ "$s" = setup ] && start_prewarm
done

stop_prewarm
say ""
say "device_run.sh: done in $(( $(now) - T_START )) s, $FAILED failed stage(s)"
pack
echo
cat "$OUT/summary.md" 2>/dev/null | tee -a "$LOG"
echo "device_run.sh: $FAILED failed stage(s); results in $OUT (summary.md, device_run.tar.gz)" | tee -a "$LOG"
exit "$FAILED"
