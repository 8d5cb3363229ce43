"""How the C++/CUDA extension is built: one description shared by setup.py (ahead of time) and _ext.py (on first
use from a source tree), so both produce the same library.

Kept free of package imports: setup.py loads this file by path before the package is installed.
"""

from __future__ import annotations

import glob
import os
import shutil
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CPU_SOURCES = ["csrc/cpu/adam.cpp", "csrc/cpu/batch_norm.cpp", "csrc/cpu/pool.cpp", "csrc/cpu/embedding_bag.cpp",
               "csrc/cpu/rnn.cpp", "csrc/cpu/conv_winograd.cpp", "csrc/cpu/max_pool.cpp", "csrc/cpu/avg_pool.cpp",
               "csrc/cpu/depthwise_conv.cpp", "python/register_ops.cpp", "python/register_autograd.cpp", "python/module.cpp"]
CUDA_SOURCES = ["csrc/cuda/adam.cu", "csrc/cuda/batch_norm.cu", "csrc/cuda/embedding_bag.cu", "csrc/cuda/rnn.cu",
                "python/register_ops_cuda.cpp"]
INCLUDE_DIRS = ["csrc/include"]

# -fopenmp matters: at::parallel_for expands to an OpenMP pragma inside the extension, which is serial without it.
# -ffp-contract=off: the shared math places its fused multiply-adds explicitly (see csrc/include/fck/adam.h).
# -fno-math-errno: sqrtf must not set errno, or the loops cannot be vectorized.
# -fno-trapping-math: no kernel reads floating-point exception flags; without it the compiler will not turn the
# compares of fck/rnn.h's exp into vector selects. Values are unchanged (unlike -ffast-math).
CXX_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"]
NVCC_FLAGS = ["-O3", "-lineinfo"]
LD_FLAGS = ["-fopenmp"]

# Used when no GPU is visible (CI, build machines): Ampere and Hopper.
DEFAULT_CUDA_ARCHS = "8.0;9.0"


def sources_present() -> bool:
    return all((ROOT / s).exists() for s in CPU_SOURCES + CUDA_SOURCES)


def cuda_toolchain() -> tuple[bool, str]:
    """Whether the CUDA kernels can be compiled here, and why not."""
    import torch
    from torch.utils import cpp_extension

    if os.environ.get("FCK_NO_CUDA_BUILD") == "1":
        return False, "FCK_NO_CUDA_BUILD=1"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU-only build"
    home = cpp_extension.CUDA_HOME
    if home is None or not (Path(home) / "bin" / "nvcc").exists() and shutil.which("nvcc") is None:
        return False, "nvcc was not found (set CUDA_HOME)"
    return True, f"nvcc in {home}"


def pip_cuda_dirs() -> tuple[list[str], list[str]]:
    """Header and library folders of the CUDA wheels torch depends on (nvidia/cu13/..., nvidia/*/...), used only
    when the CUDA toolkit lacks the cuBLAS/cuSPARSE headers that torch's CUDA headers include (a bare nvcc install).
    """
    from torch.utils import cpp_extension

    homes = [os.environ.get("CUDA_HOME"), cpp_extension.CUDA_HOME, "/usr/local/cuda"]
    if any(h and (Path(h) / "include" / "cusparse.h").exists() for h in homes):
        return [], []
    site = Path(sysconfig.get_paths()["purelib"]) / "nvidia"
    incs = sorted(p for p in glob.glob(str(site / "*" / "include")) if Path(p).is_dir())
    libs = sorted(p for p in glob.glob(str(site / "*" / "lib")) if Path(p).is_dir())
    return incs, libs


def nvcc_lib_dirs() -> list[str]:
    """lib64 of the CUDA toolkit (torch may guess CUDA_HOME=/usr/local from a wrapper script on the PATH)."""
    from torch.utils import cpp_extension

    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), cpp_extension.CUDA_HOME, "/usr/local/cuda"]
    candidates = [shutil.which("nvcc")] + [str(Path(h) / "bin" / "nvcc") for h in homes if h]
    dirs = []
    for nvcc in filter(None, candidates):
        lib = Path(nvcc).resolve().parent.parent / "lib64"
        if lib.is_dir() and str(lib) not in dirs:
            dirs.append(str(lib))
    return dirs


def set_default_arch_list() -> None:
    import torch

    if "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS


def build_kwargs(with_cuda: bool) -> dict:
    """Arguments common to CppExtension/CUDAExtension and cpp_extension.load (paths absolute)."""
    incs, libs = pip_cuda_dirs() if with_cuda else ([], [])
    if with_cuda:
        libs = nvcc_lib_dirs() + libs
    sources = CPU_SOURCES + (CUDA_SOURCES if with_cuda else [])
    defines = ["-DFCK_WITH_CUDA"] if with_cuda else []
    return {
        "sources": [str(ROOT / s) for s in sources],
        "include_dirs": [str(ROOT / d) for d in INCLUDE_DIRS] + incs,
        "library_dirs": libs,
        "cxx": CXX_FLAGS + defines,
        "nvcc": NVCC_FLAGS + defines,
        "ldflags": LD_FLAGS + [f"-L{d}" for d in libs],
    }
