"""Finds the compiled kernels: the library setup.py built (fastcore_kernels._C), or, when running from a source tree
without it, a build made on first use with torch.utils.cpp_extension.load and cached per torch version. When neither
works the package still imports; the 'cpu'/'cuda' backends report why they are unavailable and one warning says so.
"""

from __future__ import annotations

import importlib
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Extension:
    module: object | None
    with_cuda: bool
    how: str  # "prebuilt", "built on first use", or why it is unavailable

    @property
    def ok(self) -> bool:
        return self.module is not None


_lock = threading.Lock()
_loaded: Extension | None = None


def _cache_dir() -> Path:
    root = Path(os.environ.get("FCK_CACHE_DIR", Path.home() / ".cache" / "fastcore_kernels"))
    tag = f"torch{torch.__version__.replace('+', '_')}"
    return root / tag


def _build_on_first_use() -> Extension:
    from fastcore_kernels import _build
    from torch.utils import cpp_extension

    if not _build.sources_present():
        raise RuntimeError("the package was not built by setup.py and its C++ sources are not beside it")
    with_cuda, _ = _build.cuda_toolchain()
    if with_cuda:
        _build.set_default_arch_list()
    kw = _build.build_kwargs(with_cuda)
    build_dir = _cache_dir() / ("cuda" if with_cuda else "cpu")
    build_dir.mkdir(parents=True, exist_ok=True)
    module = cpp_extension.load(
        name="fastcore_kernels_C",
        sources=kw["sources"],
        extra_include_paths=kw["include_dirs"],
        extra_cflags=kw["cxx"],
        extra_cuda_cflags=kw["nvcc"],
        extra_ldflags=kw["ldflags"],
        with_cuda=with_cuda,
        build_directory=str(build_dir),
        verbose=os.environ.get("FCK_VERBOSE_BUILD") == "1",
    )
    return Extension(module, bool(module.with_cuda), "built on first use in " + str(build_dir))


def _load() -> Extension:
    if os.environ.get("FCK_NO_EXTENSION") == "1":
        return Extension(None, False, "disabled by FCK_NO_EXTENSION=1")
    try:
        module = importlib.import_module("fastcore_kernels._C")
        return Extension(module, bool(module.with_cuda), "prebuilt")
    except ImportError as prebuilt_error:
        try:
            return _build_on_first_use()
        except Exception as build_error:  # noqa: BLE001 - any build failure means "fall back", with the reason shown
            reason = (
                f"no prebuilt fastcore_kernels._C ({prebuilt_error}); building it failed: "
                f"{type(build_error).__name__}: {str(build_error).strip().splitlines()[-1] if str(build_error).strip() else ''}"
            )
            warnings.warn(
                f"fastcore_kernels: C++/CUDA kernels unavailable, so the 'cpu' and 'cuda' backends are disabled and "
                f"'reference'/'triton' serve instead. Reason: {reason}",
                RuntimeWarning,
                stacklevel=3,
            )
            return Extension(None, False, reason)


def extension() -> Extension:
    """The compiled kernels, loaded (or built) once per process."""
    global _loaded
    if _loaded is None:
        with _lock:
            if _loaded is None:
                _loaded = _load()
                if _loaded.ok:
                    from fastcore_kernels.ops import _register_fakes

                    _register_fakes()
    return _loaded
