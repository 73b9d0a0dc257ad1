"""The CMake build of csrc/ for C++ users (CMakeLists.txt): configure and build it
against this Python's libtorch in a temporary directory, then load the library in a
fresh process (one that never imports fused_resnet, whose _C registers the same
TORCH_LIBRARY) and run the operators on small tensors."""
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHECK = textwrap.dedent("""
    import sys, torch
    torch.ops.load_library(sys.argv[1])
    assert "fused_resnet" not in sys.modules
    ops = torch.ops.fused_resnet
    torch.manual_seed(0)
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = (torch.randn(3, 19, 5, 7) * 2 + 1).contiguous(memory_format=fmt)
        mean, var = ops.bn_stats(x)
        rv, rm = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
        assert mean.dtype == torch.float32 and mean.shape == (19,)
        assert torch.allclose(mean.double(), rm, rtol=1e-5, atol=1e-6), (mean, rm)
        assert torch.allclose(var.double(), rv, rtol=1e-5, atol=1e-6), (var, rv)
        s, b = torch.randn(19), torch.randn(19)
        r = torch.randn_like(x)
        out = ops.bn_apply(x, s, b, r, None, None, None, True)
        ref = (x * s.view(1, -1, 1, 1) + b.view(1, -1, 1, 1) + r).relu()
        assert out.stride() == ref.stride() and torch.allclose(out, ref, atol=1e-5)
    print("OK", torch.backends.cpu.get_cpu_capability())
""")


@pytest.mark.slow
def test_cmake_build(tmp_path):
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake is not installed")
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler")
    build = tmp_path / "build"
    configure = [cmake, "-S", ROOT, "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                 f"-DPython3_EXECUTABLE={sys.executable}"]
    if shutil.which("ninja"):
        configure += ["-G", "Ninja"]
    proc = subprocess.run(configure, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, "cmake configure failed:\n" + proc.stdout + proc.stderr
    jobs = str(max(1, min(os.cpu_count() or 1, 4)))
    proc = subprocess.run([cmake, "--build", str(build), "-j", jobs], capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, "cmake build failed:\n" + proc.stdout[-6000:] + proc.stderr
    libs = [p for p in build.iterdir() if p.name.startswith("libfused_resnet.")]
    assert libs, f"no libfused_resnet.* in {sorted(p.name for p in build.iterdir())}"

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", CHECK, str(libs[0])], capture_output=True,
                          text=True, timeout=300, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr
