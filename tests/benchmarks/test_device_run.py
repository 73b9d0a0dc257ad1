"""benchmarks/device_run.sh --dry-run: the prepared GPU run rehearsed on this CPU machine at
toy size. It must exit 0 (every stage PASS or a legitimate SKIP), leave its four files in
$OUT (the archive with every stage's log, summary.md with one line per stage,
summary.json, the console log) and nothing in the checkout; about 2-3 minutes on 2 cores."""
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "device_run.sh"
STAGES = ["setup", "correctness", "sanitize", "bn_ops", "triton_conv", "bench", "profile"]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("device_run") / "out"
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable,
               TMPDIR=str(tmp_path_factory.mktemp("work")))
    # conftest.py sets TRITON_INTERPRET for this process; the script's own pytest runs set
    # it again (its conftest), everything else must run as from a plain shell
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run"], cwd=ROOT, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=480)
    return proc, out


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                    reason="needs bash and coreutils' timeout")
def test_dry_run_passes_and_packs_every_stage(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == [
        "device_run.log", "device_run.tar.gz", "summary.json", "summary.md"]

    with tarfile.open(out / "device_run.tar.gz") as tar:
        names = tar.getnames()
    top = {n.split("/")[0] for n in names}
    assert len(top) == 1 and top.pop().startswith("device_dryrun_"), sorted(names)[:5]
    root = names[0].split("/")[0]
    for i, stage in enumerate(STAGES, 1):
        assert f"{root}/logs/{i}_{stage}.log" in names, stage
    for member in ("summary.md", "summary.json", "env.json", "device_run.log",
                   "pytest/cuda.xml", "pytest/triton.xml", "sanitize/cpu.json",
                   "check/check_resnet18_fp64_cpu.json", "profile/profile_cpu_tiny.json",
                   "bench/bench_resnet18_train_all_cpu.json",
                   "bench/bench_resnet18_infer_all_cpu.json"):
        assert f"{root}/{member}" in names, member

    md = (out / "summary.md").read_text()
    for i, stage in enumerate(STAGES, 1):
        lines = [line for line in md.splitlines() if line.startswith(f"| {i} | {stage} |")]
        assert len(lines) == 1, (stage, lines)
        status = lines[0].split("|")[3].strip()
        assert status in ("PASS", "SKIP"), lines[0]
    # the GPU-only stages say why they skipped; the others ran
    assert "no CUDA device" in md

    doc = json.loads((out / "summary.json").read_text())
    assert doc["mode"] == "dry-run" and doc["failed_stages"] == 0
    assert [s["name"] for s in doc["stages"]] == STAGES
    assert {(r["model"], r["mode"]) for r in doc["bench"]} == {("resnet18", "train"),
                                                               ("resnet18", "infer")}
    for run in doc["bench"]:
        assert run["img_per_s"]["eager"] and run["img_per_s"]["fused"]
        assert run["img_per_s"]["fused-graphs"] is None          # needs CUDA
        assert "needs CUDA" in run["notes"]["fused-graphs"]
        assert run["fused_vs_baseline"] is not None
    assert doc["pytest"]["cuda"]["failures"] == 0 and doc["pytest"]["cuda"]["passed"] > 0
    assert all(c["passed"] for c in doc["check"]) and doc["check"]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                    reason="needs bash and coreutils' timeout")
def test_unpack_puts_the_run_folder_in_dest(dry_run, tmp_path):
    proc, out = dry_run
    assert proc.returncode == 0
    dest = tmp_path / "results"
    res = subprocess.run(["bash", str(SCRIPT), "--unpack", str(out / "device_run.tar.gz"),
                          str(dest)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    (folder,) = dest.iterdir()
    assert folder.name.startswith("device_dryrun_")
    assert (folder / "summary.md").read_text() == (out / "summary.md").read_text()
    assert (folder / "logs" / "6_bench.log").is_file()


def test_usage_errors():
    res = subprocess.run(["bash", str(SCRIPT), "--no-such-option"], capture_output=True,
                         text=True, timeout=30)
    assert res.returncode == 2 and "unknown argument" in res.stderr
    res = subprocess.run(["bash", str(SCRIPT), "--unpack", "/nonexistent.tar.gz"],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 2 and "usage" in res.stderr
