"""Build fused_resnet._C: the C++ CPU kernels always, the CUDA kernels when a CUDA
toolkit and a CUDA build of torch are present (FUSED_RESNET_CUDA=0/1 overrides).

The CUDA build is kept lean on purpose (one arch, ninja, few translation units): on
a 2-core machine each .cu file costs about two minutes.
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _find_cuda_home():
    """torch guesses CUDA_HOME from `which nvcc`, which gives /usr/local for a wrapper at
    /usr/local/bin/nvcc: pick a directory that really holds a toolkit (nvcc, headers
    and libcudart), before torch.utils.cpp_extension reads the variable at import."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    candidates = ["/usr/local/cuda"]
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for candidate in candidates:
        if all(os.path.exists(os.path.join(candidate, f))
               for f in ("bin/nvcc", "include/cuda_runtime.h")) and \
                glob.glob(os.path.join(candidate, "lib*", "libcudart.so*")):
            os.environ["CUDA_HOME"] = candidate
            return


_find_cuda_home()


def _want_cuda():
    flag = os.environ.get("FUSED_RESNET_CUDA", "auto").strip().lower()
    if flag in ("0", "false", "no", "off"):
        return False
    import torch
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME or os.environ.get("CUDA_HOME")
    nvcc = home and os.path.exists(os.path.join(home, "bin", "nvcc"))
    found = torch.version.cuda is not None and bool(nvcc)
    if flag in ("1", "true", "yes", "on") and not found:
        sys.exit("FUSED_RESNET_CUDA=1 but no CUDA toolkit (nvcc under CUDA_HOME) "
                 "or no CUDA build of torch was found")
    return found


def _cuda_header_dirs():
    """ATen/cuda headers include cusparse.h, cudnn.h ...: with a pip CUDA torch those
    live in site-packages/nvidia/*/include, not in the toolkit."""
    dirs = []
    for entry in sys.path:
        dirs += sorted(glob.glob(os.path.join(entry, "nvidia", "*", "include")))
    return [d for d in dict.fromkeys(dirs) if os.path.isdir(d)]


def _extensions():
    from torch.utils import cpp_extension

    cpp_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cxx_flags = ["-O3", "-fopenmp"]  # no -std: torch picks the standard its headers need
    define_macros = [("FUSED_RESNET_PYTHON_MODULE", None)]
    if not _want_cuda():
        return [cpp_extension.CppExtension(
            "fused_resnet._C", cpp_sources, extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"], define_macros=define_macros)]
    cuda_home = cpp_extension.CUDA_HOME
    os.environ.setdefault("CUDA_HOME", cuda_home)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    define_macros.append(("FUSED_RESNET_WITH_CUDA", None))
    return [cpp_extension.CUDAExtension(
        "fused_resnet._C", cpp_sources + cuda_sources,
        include_dirs=_cuda_header_dirs(),
        extra_compile_args={"cxx": cxx_flags,
                            "nvcc": ["-O3", "--use_fast_math",
                                     "-lineinfo", "--expt-relaxed-constexpr"]},
        extra_link_args=["-fopenmp"], define_macros=define_macros)]


def _build_ext():
    from torch.utils import cpp_extension

    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 2))
    if shutil.which("ninja") is None:
        try:
            import ninja  # noqa: F401  (pip's ninja puts the binary on PATH)
            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ["PATH"]
        except ImportError:
            pass
    return cpp_extension.BuildExtension.with_options(use_ninja=True)


setup(
    name="fused_resnet",
    version="0.1.0",
    description="Fused conv + batch norm + ReLU + shortcut kernels for ResNets, "
                "registered as PyTorch operators, with a torchvision-compatible model zoo",
    packages=find_packages(include=["fused_resnet", "fused_resnet.*"]),
    package_data={"fused_resnet.backends": ["README.md"]},
    ext_modules=_extensions(),
    cmdclass={"build_ext": _build_ext()},
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "torchvision>=0.19", "tqdm", "matplotlib"],
    extras_require={"test": ["pytest", "scikit-learn"]},
    entry_points={"console_scripts": ["fused-resnet=fused_resnet.tools.cli:main"]},
)
