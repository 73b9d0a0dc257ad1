"""The command line (`python -m fused_resnet bench|check`), the GPU suite and the profiler
script, at toy sizes on CPU: resnet18, 32x32, batch 2, one or two steps."""
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fused_resnet.tools import cli

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--model", "resnet18", "--resolution", "32", "--batch", "2", "--device", "cpu",
        "--no-progress"]
ROW_KEYS = {"model", "mode", "dtype", "layout", "batch", "resolution", "impl", "img_per_s",
            "peak_mem_gib", "step_ms", "host_ms_per_step", "ops_per_step", "syncs_per_step"}


def _png(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 1000 and \
        path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _matplotlib() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


# --- bench ----------------------------------------------------------------------------------

def test_bench_table_json_png(tmp_path, capsys):
    out = tmp_path / "run.json"
    code = cli.main(["bench", *TINY, "--mode", "train", "--warmup", "0", "--steps", "1",
                     "--impl", "eager,fused,fused-cuda", "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 0
    # the table: every impl, its throughput and ratio, the unavailable one with its reason
    assert "img/s" in text and "vs eager" in text and "peak GiB" in text
    assert "1.00x" in text
    assert "fused-cuda" in text and "unavailable: " in text
    assert "CPU allocations are not tracked" in text  # the peak-memory footnote

    doc = json.loads(out.read_text())
    for key in ("device", "torch", "triton", "date", "rows", "torchvision", "python", "command"):
        assert key in doc
    assert doc["device"] == "cpu"
    assert [r["impl"] for r in doc["rows"]] == ["eager", "fused", "fused-cuda"]
    for row in doc["rows"]:
        assert set(row) == ROW_KEYS
        assert (row["model"], row["mode"], row["batch"], row["resolution"]) == \
            ("resnet18", "train", 2, 32)
        assert row["peak_mem_gib"] is None  # not measured on CPU
    eager, fused, cuda = doc["rows"]
    assert eager["dtype"] == "fp32" and eager["img_per_s"] > 0
    assert fused["img_per_s"] > 0
    assert cuda["img_per_s"] is None
    if _matplotlib():
        assert _png(out.with_suffix(".png"))


def test_bench_both_modes_default_out_name(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = cli.main(["bench", *TINY, "--mode", "both", "--warmup", "0", "--steps", "1",
                     "--impl", "fused,eager-cl-amp@bf16", "--out"])
    text = capsys.readouterr().out
    assert code == 0
    # eager is absent: ratios are against the first implementation
    assert "vs fused" in text
    assert "resnet18 train" in text and "resnet18 infer" in text
    path = tmp_path / "benchmarks" / "results" / "bench_resnet18_both_cpu.json"
    doc = json.loads(path.read_text())
    assert [(r["mode"], r["impl"], r["dtype"]) for r in doc["rows"]] == [
        ("train", "fused", "fp32"), ("train", "eager-cl-amp@bf16", "bf16"),
        ("infer", "fused", "fp32"), ("infer", "eager-cl-amp@bf16", "bf16")]
    if _matplotlib():
        assert _png(path.with_suffix(".png"))


@pytest.mark.parametrize("argv, message", [
    (["--model", "resnet5"], "unknown model 'resnet5'"),
    (["--impl", "eager,fast"], "unknown implementation 'fast'"),
    (["--impl", "eager-cl-amp@fp32"], "under autocast"),
    (["--impl", "eager@fp8"], "unknown suffix 'fp8'"),
    (["--memory-format", "nhwc"], "invalid choice"),
    (["--batch", "0"], "must be a positive integer"),
    (["--steps", "0"], "must be a positive integer"),
    (["--warmup", "-1"], "must be >= 0"),
    (["--dtype", "fp8"], "invalid choice"),
    (["--mode", "fit"], "invalid choice"),
])
def test_bench_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert "usage:" in err


def test_bench_compares_like_with_like(tmp_path, capsys):
    """Every row at the run's dtype and layout unless its label says otherwise; the
    dispatched ops and host milliseconds per step; CUDA-graph rows need CUDA."""
    out = tmp_path / "like.json"
    code = cli.main(["bench", *TINY, "--warmup", "0", "--steps", "1", "--compile-backend",
                     "eager", "--impl", "eager,compile,fused,eager@nchw,fused-graphs,"
                     "compile-graphs,eager-cl-amp", "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 0 and "ops/step" in text and "host ms" in text
    rows = {r["impl"]: r for r in json.loads(out.read_text())["rows"]}
    for name in ("eager", "compile", "fused"):
        assert (rows[name]["dtype"], rows[name]["layout"]) == ("fp32", "channels_last"), name
        assert rows[name]["img_per_s"] > 0 and rows[name]["host_ms_per_step"] > 0
    assert rows["eager@nchw"]["layout"] == "NCHW"
    assert rows["eager"]["ops_per_step"] > 0 and rows["fused"]["ops_per_step"] > 0
    assert rows["eager"]["syncs_per_step"] == rows["fused"]["syncs_per_step"] == 0
    assert rows["compile"]["ops_per_step"] is None       # compiled: not dispatched op by op
    details = {d["impl"]: d for d in json.loads(out.read_text())["details"]}
    for name in ("fused-graphs", "compile-graphs"):
        assert rows[name]["img_per_s"] is None and "needs CUDA" in details[name]["note"]
    assert "needs --dtype bf16 or fp16" in details["eager-cl-amp"]["note"]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_bench_cuda_without_gpu_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--device", "cuda"])
    assert exc.value.code == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_suite_tiny(tmp_path, capsys):
    code = cli.main(["bench", "--suite", "gpu", "--tiny", "--model", "resnet18", "--mode",
                     "train", "--impl", "eager,compile,fused", "--out", str(tmp_path),
                     "--no-progress"])
    text = capsys.readouterr().out
    assert code == 0
    run = tmp_path / "bench_resnet18_train_b2_cpu_tiny.json"
    doc = json.loads(run.read_text())
    assert {r["impl"] for r in doc["rows"]} == {"eager", "compile", "fused"}
    assert all(set(r) == ROW_KEYS for r in doc["rows"])
    assert "skipped in --tiny mode" in text  # compile: reported, not run, on CPU
    summary = json.loads((tmp_path / "suite_cpu_tiny.json").read_text())
    assert len(summary["rows"]) == 3
    assert "| eager |" in (tmp_path / "suite_cpu_tiny.md").read_text()
    if _matplotlib():
        assert _png(run.with_suffix(".png"))


# --- check ----------------------------------------------------------------------------------

def test_check_fp64_passes(tmp_path, capsys):
    path = tmp_path / "check.json"
    code = cli.main(["check", "--model", "resnet18", "--resolution", "32", "--batch", "2",
                     "--device", "cpu", "--json", str(path), "--no-progress"])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "PASS" in text and "parameter gradients" in text and "running statistics" in text
    doc = json.loads(path.read_text())
    assert doc["passed"] is True and doc["dtype"] == "fp64"
    quantities = {(c["phase"], c["quantity"]) for c in doc["checks"]}
    for phase in ("train", "eval"):
        for q in ("output", "loss", "input gradient", "parameter gradients"):
            assert (phase, q) in quantities
    assert ("train", "running statistics") in quantities
    assert max(c["fused_vs_ref"] for c in doc["checks"]) <= 1e-8


def test_check_fails_with_exit_code_1(capsys):
    code = cli.main(["check", "--model", "resnet18", "--resolution", "32", "--batch", "2",
                     "--device", "cpu", "--tol", "1e-30", "--no-progress"])
    text = capsys.readouterr().out
    assert code == 1
    assert "FAIL" in text


def test_check_fp32_against_fp64_reference(tmp_path, capsys):
    # The lower-precision code path (fused and torchvision in fp32, torchvision fp64 as the
    # reference), one batch, quick. Gradients through ReLU are discontinuous (one mask flip
    # moves them by ~1e-2 in fp32, which is why `check` defaults to 3 batches), so the
    # floor is generous here and the numbers asserted are the forward ones, which are
    # continuous. Batch 4 at 64x64, not 2 at 32x32, where the last stage's batch norm sees
    # two values per channel and rounding turns chaotic.
    path = tmp_path / "check_fp32.json"
    code = cli.main(["check", "--model", "resnet18", "--device", "cpu", "--dtype", "fp32",
                     "--resolution", "64", "--batch", "4", "--channels-last", "--trials", "1",
                     "--floor", "0.05", "--json", str(path), "--no-progress"])
    text = capsys.readouterr().out
    assert "fused vs fp64" in text and "torchvision vs fp64" in text and "ratio" in text
    assert code == 0, text
    doc = json.loads(path.read_text())
    assert doc["dtype"] == "fp32" and doc["reference"] == "torchvision fp64"
    by = {(c["phase"], c["quantity"]): c for c in doc["checks"]}
    for phase in ("train", "eval"):
        out = by[(phase, "output")]
        assert out["fused_vs_ref"] < 1e-4 and out["torchvision_vs_ref"] < 1e-4
        assert out["fused_vs_ref"] <= 2 * out["torchvision_vs_ref"] + 1e-6
    assert by[("train", "running statistics")]["fused_vs_ref"] < 1e-4


@pytest.mark.parametrize("argv, message", [
    (["--model", "vgg16"], "invalid choice"),
    (["--batch", "0"], "must be a positive integer"),
    (["--batch", "1"], "--batch must be >= 2"),
    (["--backend", "fastest"], "invalid choice"),
    (["--resolution", "8"], "--resolution must be >= 32"),
])
def test_check_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["check", "--device", "cpu", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_check_unavailable_backend_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["check", "--device", "cpu", "--backend", "cuda"])
    assert exc.value.code == 2
    assert "--backend cuda: unavailable" in capsys.readouterr().err


# --- the command line itself ----------------------------------------------------------------

def test_subcommands(capsys):
    """cli.SUBCOMMANDS is the table of subcommands: bench, check, train; nothing else is
    one."""
    assert list(cli.SUBCOMMANDS) == ["bench", "check", "train"]
    for module in cli.SUBCOMMANDS.values():
        assert callable(module.add_arguments) and callable(module.run)
    for name in ("evaluate", "export", "profile"):
        with pytest.raises(SystemExit) as exc:
            cli.main([name])
        assert exc.value.code == 2
        assert "invalid choice" in capsys.readouterr().err


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    # argparse's list of subcommands: "    <name>   <help>", continuation lines indented more
    assert re.findall(r"^ {4}(\w+) {2,}", out, flags=re.M) == ["bench", "check", "train"]


def test_python_dash_m():
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONWARNINGS="ignore")
    res = subprocess.run([sys.executable, "-m", "fused_resnet", "bench", "--impl", "nope"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert "unknown implementation 'nope'" in res.stderr
    assert "python -m fused_resnet bench" in res.stderr  # the usage line


# --- the profiler script --------------------------------------------------------------------

def test_profile_step_tiny(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("profile_step",
                                                  ROOT / "benchmarks" / "profile_step.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    code = mod.main(["--tiny", "--model", "resnet18", "--impl", "eager,fused,compile",
                     "--warmup", "0", "--out-dir", str(tmp_path)])
    assert code == 0
    doc = json.loads((tmp_path / "profile_cpu_tiny.json").read_text())
    entries = {e["impl"]: e for e in doc["entries"]}
    assert entries["compile"]["status"] == "unavailable"
    for impl in ("eager", "fused"):
        e = entries[impl]
        assert e["status"] == "ok"
        assert set(e["categories"]) == set(mod.CATEGORIES)
        assert e["total_ms"] > 0 and e["kernels"] > 0
        assert abs(sum(c["ms"] for c in e["categories"].values()) - e["total_ms"]) < 1e-6
        assert e["categories"]["convolution"]["ms"] > 0
    assert "convolution ms" in (tmp_path / "profile_cpu_tiny.md").read_text()


def test_profile_classification():
    spec = importlib.util.spec_from_file_location("profile_step",
                                                  ROOT / "benchmarks" / "profile_step.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    gpu = {
        "sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc": "convolution",
        "cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_16x16_128x1_tn_align8>":
            "convolution",
        "triton_tem_fused_convolution_0": "convolution",
        "cudnn::bn_fw_tr_1C11_kernel_NCHW<float, float, int, 512, true, 1>":
            "normalisation/elementwise",
        "void at::native::batch_norm_collect_statistics_channels_last_kernel<float>":
            "normalisation/elementwise",
        "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>":
            "normalisation/elementwise",
        "triton_poi_fused_add_relu_3": "normalisation/elementwise",
        "void at::native::(anonymous namespace)::max_pool_forward_nhwc<float>": "other",
        "void at::native::multi_tensor_apply_kernel<SGD>": "other",
        "void cudnn::engines_precompiled::nchwToNhwcKernel<float>": "other",
        "Memset (Device)": "other",
    }
    for name, category in gpu.items():
        assert mod.classify(name, mod.GPU_PATTERNS) == category, name
    assert mod.classify("aten::mkldnn_convolution", mod.CPU_PATTERNS) == "convolution"
    assert mod.classify("fused_resnet::bn_apply", mod.CPU_PATTERNS) == "normalisation/elementwise"
    assert mod.classify("aten::max_pool2d_with_indices", mod.CPU_PATTERNS) == "other"
