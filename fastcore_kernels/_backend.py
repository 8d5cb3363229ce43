"""Backend selection: which implementation of an op runs for a tensor's device.

Precedence: `use_backend(...)` (innermost wins) > `set_backend(...)` > the FCK_BACKEND environment variable (read at
the first call and by `set_backend(None)`) > "auto".
An explicitly chosen backend that cannot serve a device raises; "auto" never does.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import os
from dataclasses import dataclass

import torch
import torch.autograd.forward_ad as _forward_ad

BACKENDS = ("reference", "cpu", "cuda", "triton")
_CHOICES = ("auto",) + BACKENDS

_global_choice: str | None = None
_scoped_choice: contextvars.ContextVar[str | None] = contextvars.ContextVar("fck_backend", default=None)
# What torch.compile reads instead of _scoped_choice, which torch 2.4 cannot trace: the innermost `use_backend`
# entered (by any thread). Dynamo guards on the module global, so code compiled outside a `with use_backend(...)`
# block recompiles inside it.
_scoped_traced: str | None = None


@dataclass(frozen=True)
class BackendStatus:
    available: bool
    devices: tuple[str, ...]  # device types this backend can serve in this process
    reason: str

    def __str__(self) -> str:
        state = f"available on {', '.join(self.devices)}" if self.available else "unavailable"
        return f"{state} ({self.reason})"


def _validate(name: str) -> str:
    name = name.lower().strip()
    if name not in _CHOICES:
        raise ValueError(f"unknown fastcore_kernels backend {name!r}; choose one of {', '.join(_CHOICES)}")
    return name


def set_backend(name: str | None) -> None:
    """Select the backend for all later calls ("auto", "reference", "cpu", "cuda" or "triton"); None goes back to
    the FCK_BACKEND environment variable (default "auto")."""
    global _global_choice, _env_name
    _global_choice = None if name is None else _validate(name)
    if name is None:
        _env_name = None


@contextlib.contextmanager
def use_backend(name: str):
    """Select a backend inside a `with` block only (per thread in eager code; torch.compile'd code sees the
    innermost block entered by any thread)."""
    global _scoped_traced
    name = _validate(name)
    token = _scoped_choice.set(name)
    outer, _scoped_traced = _scoped_traced, name
    try:
        yield
    finally:
        _scoped_choice.reset(token)
        _scoped_traced = outer


def get_backend() -> str:
    """The backend choice in force here (may be "auto")."""
    return _choice(compiling())


def _choice(traced: bool) -> str:
    scoped = _scoped_traced if traced else _scoped_choice.get()
    if scoped is not None:
        return scoped
    if _global_choice is not None:
        return _global_choice
    if traced:
        return _env_backend_traced()
    return _env_name if _env_name is not None else _env_backend()


# FCK_BACKEND, validated, read on first use and again by set_backend(None): not on every call, as every op resolves
# its backend per call and an unset variable's lookup (os.environ raises and catches a KeyError) took 0.8 us of an
# embedding lookup's ~10.
_env_name: str | None = None


def _env_backend() -> str:
    global _env_name
    _env_name = _validate(os.environ.get("FCK_BACKEND") or "auto")
    return _env_name


# torch.compile'd code takes FCK_BACKEND's value when it compiles (torch 2.4 cannot trace a lookup of an unset
# environment variable).
@torch.compiler.assume_constant_result
def _env_backend_traced() -> str:
    return _env_name if _env_name is not None else _env_backend()


@torch.compiler.assume_constant_result  # torch 2.4 cannot trace the environment lookup
def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


_status_cache: dict[tuple[str, bool], BackendStatus] = {}


def _status(name: str) -> BackendStatus:
    # A plain dict rather than lru_cache: torch.compile traces through dict lookups without warnings.
    key = (name, triton_interpreting())
    status = _status_cache.get(key)
    if status is None:
        status = _status_cache[key] = _probe(name, key[1])
    return status


def _probe(name: str, interpreting: bool) -> BackendStatus:
    if name == "reference":
        return BackendStatus(True, ("cpu", "cuda"), "pure PyTorch")
    if name == "triton":
        if importlib.util.find_spec("triton") is None:
            return BackendStatus(False, (), "triton is not installed")
        if interpreting:  # every Triton kernel, CUDA tensors' too, then runs in the interpreter
            import numpy
            import triton

            try:
                from fastcore_kernels.triton._common import interpreter_runs

                why = None if interpreter_runs() else (f"does not run under numpy {numpy.__version__} (Triton 3.0 "
                                                       "needs numpy < 2)")
            except Exception as e:  # an interpreter that cannot run a kernel at all
                why = f"failed to run a kernel: {type(e).__name__}: {e}"
            if why:
                return BackendStatus(False, (), f"Triton {triton.__version__}'s CPU interpreter {why}")
        devices = (("cuda",) if torch.cuda.is_available() else ()) + (("cpu",) if interpreting else ())
        if not devices:
            return BackendStatus(False, (), "no CUDA device (set TRITON_INTERPRET=1 to run Triton kernels on the CPU)")
        why = "CUDA device" if "cuda" in devices else "TRITON_INTERPRET=1, CPU interpreter"
        return BackendStatus(True, devices, why)
    from fastcore_kernels._ext import extension

    ext = extension()
    if not ext.ok:
        return BackendStatus(False, (), f"C++ extension unavailable: {ext.how}")
    if name == "cpu":
        return BackendStatus(True, ("cpu",), f"C++ extension, {ext.how}")
    if not ext.with_cuda:
        return BackendStatus(False, (), "the C++ extension was built without CUDA")
    if not torch.cuda.is_available():
        return BackendStatus(False, (), "CUDA kernels are built but no CUDA device is visible")
    return BackendStatus(True, ("cuda",), f"CUDA kernels, {ext.how}")


# Probing loads the extension under a lock, which torch.compile cannot trace: a model compiled before any eager call
# (fullgraph=True) takes the answer as a constant of its graph.
@torch.compiler.assume_constant_result
def _serves(name: str, kind: str) -> bool:
    return kind in _status(name).devices


def backends() -> dict[str, BackendStatus]:
    """Every backend with whether it can run in this process, where, and why (not)."""
    return {name: _status(name) for name in BACKENDS}


# What "auto" tries, fastest first, per device type; and what it picked, per (device type, the op's backends), as
# _status is cached (the interpreter flag that _status keys on only adds the CPU to Triton, which CPU's auto skips).
# Eager calls look it up by the device itself: `device.type` builds a string (0.3 us a call).
_AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}
_auto_choice: dict[tuple, str] = {}
_auto_by_device: dict[tuple, str] = {}


def resolve(device: torch.device, choice: str | None = None, implemented: tuple[str, ...] = BACKENDS,
            op: str = "this op") -> str:
    """The backend that will run an op on `device`: `choice` if given, else the user's selection. `implemented`
    names the backends the op has kernels for; "auto" skips the others, an explicit choice of one raises."""
    traced = compiling()
    if not traced and _in_transform():
        return "reference"
    choice = _validate(choice) if choice is not None else _choice(traced)
    if choice == "auto":
        if not traced:
            name = _auto_by_device.get((device, implemented))
            if name is not None:
                return name
        kind = device.type
        key = (kind, implemented)
        name = _auto_choice.get(key)
        if name is None:
            name = "reference"
            for n in _AUTO_ORDER.get(kind, ("reference",)):  # a loop: torch 2.4's compile cannot trace next(gen, x)
                if n in implemented and _serves(n, kind):
                    name = n
                    break
            _auto_choice[key] = name
        if not traced:
            _auto_by_device[(device, implemented)] = name
        return name
    kind = device.type
    if choice not in implemented:
        raise NotImplementedError(f"{op} has no {choice!r} kernels yet; it runs on {', '.join(implemented)}")
    if not _serves(choice, kind):
        raise RuntimeError(f"fastcore_kernels backend {choice!r} cannot run on {kind} tensors: {_status(choice)}")
    return choice


def transformed() -> bool:
    """True inside a torch.func transform (grad, vjp, jacrev, jvp, vmap, ...) or a forward-mode AD level
    (torch.autograd.forward_ad.dual_level). Our kernels have C++ autograd nodes and no batching or forward-mode rules,
    which the transforms need, so every op then runs its reference implementation (plain PyTorch ops, which every
    transform composes through), whatever backend was chosen. False while torch.compile traces (it takes the
    Python paths anyway, and torch 2.4's cannot trace the question)."""
    return not compiling() and _in_transform()


def _in_transform() -> bool:
    return torch._C._are_functorch_transforms_active() or _forward_ad._current_level >= 0


def compiling() -> bool:
    """True while torch.compile traces: the ops with C++ autograd (eager-only) take their Python autograd path."""
    return torch.compiler.is_compiling()  # in every supported torch (>= 2.4)
