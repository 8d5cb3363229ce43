"""Builds fastcore_kernels._C ahead of time with ninja: CPU kernels always, CUDA kernels when torch has CUDA and nvcc is
found. Install with `pip install --no-build-isolation -e .` (the build needs the torch it will run with).
FCK_NO_CUDA_BUILD=1 skips the CUDA kernels; TORCH_CUDA_ARCH_LIST picks GPU architectures (default: the visible GPU,
else 8.0;9.0)."""

import importlib.util
from pathlib import Path

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

_spec = importlib.util.spec_from_file_location("_build", Path(__file__).parent / "fastcore_kernels" / "_build.py")
_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_build)

with_cuda, why = _build.cuda_toolchain()
print(f"fastcore_kernels: building CPU kernels{' and CUDA kernels' if with_cuda else ''} ({why})")
if with_cuda:
    _build.set_default_arch_list()
kw = _build.build_kwargs(with_cuda)
Extension = CUDAExtension if with_cuda else CppExtension
ext = Extension(
    name="fastcore_kernels._C",
    sources=[str(Path(s).relative_to(_build.ROOT)) for s in kw["sources"]],
    include_dirs=kw["include_dirs"],
    library_dirs=kw["library_dirs"],
    extra_compile_args={"cxx": kw["cxx"], "nvcc": kw["nvcc"]} if with_cuda else kw["cxx"],
    extra_link_args=kw["ldflags"],
)

setup(
    packages=find_packages(include=["fastcore_kernels", "fastcore_kernels.*"]),
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
