"""`adam_`: one multi-tensor Adam/AdamW step, in place, on any backend.

Backends: C++ (`torch.ops.fck.adam_`, CPU and CUDA kernels from csrc/), Triton (`torch.ops.fck.adam_triton_`, a
custom op around fastcore_kernels/triton/adam.py) and the reference (plain PyTorch). Both compiled variants are
opaque torch.library ops with fake kernels, so an optimizer step calling them traces under torch.compile.
"""

from __future__ import annotations

from typing import Sequence

import torch

from fastcore_kernels import _backend
from fastcore_kernels.ops._triton_op import triton_op
from fastcore_kernels.reference import adam as reference

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_STATE_LISTS = ("exp_avgs", "exp_avg_sqs")


def _fake_adam(*args, **kwargs) -> None:
    return None


def register_fake() -> None:
    torch.library.register_fake("fck::adam_")(_fake_adam)


# The schema of fck::adam_ (python/register_ops.cpp), so the Triton op takes exactly the C++ op's arguments.
ADAM_SCHEMA = (
    "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
    "Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] master_params, Tensor(f!)[] state_steps, float lr, float beta1, "
    "float beta2, float eps, float weight_decay, bool amsgrad, bool maximize, bool decoupled_weight_decay, "
    "float inv_grad_scale) -> ()"
)


triton_op("adam_triton_", "adam.adam_", ADAM_SCHEMA, _fake_adam,
          mutates_args=("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "master_params", "state_steps"))


def _cxx(*args) -> None:
    torch.ops.fck.adam_(*args)  # resolve() has loaded the library that defines it


def _triton(*args) -> None:
    torch.ops.fck.adam_triton_(*args)


_IMPLS = {"reference": reference.adam_, "cpu": _cxx, "cuda": _cxx, "triton": _triton}


def _check(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, state_steps, amsgrad,
           backend: str) -> None:
    """List-level checks here; per-tensor checks here for the Python backends, and in C++ for the C++ ones
    (csrc/include/fck/adam_host.h, the same rules), so the per-step cost is not paid twice."""
    n = len(params)
    lists = {"grads": grads, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs, "state_steps": state_steps}
    if amsgrad:
        lists["max_exp_avg_sqs"] = max_exp_avg_sqs
    elif max_exp_avg_sqs:
        raise ValueError("adam_: max_exp_avg_sqs must be empty when amsgrad=False")
    if master_params:
        lists["master_params"] = master_params
    for name, lst in lists.items():
        if len(lst) != n:
            raise ValueError(f"adam_: {name} has {len(lst)} tensors but params has {n}")
    if n == 0 or backend in ("cpu", "cuda"):
        return
    flat = backend != "reference"  # kernels treat each tensor as a flat array: dense, with its param's strides
    device, dtype = params[0].device, params[0].dtype
    if dtype not in SUPPORTED_DTYPES and not (dtype == torch.float64 and not master_params):
        raise TypeError(f"adam_: params must be float32, float16, bfloat16 (or float64), got {dtype}")
    state_dtype = torch.float32 if master_params else dtype
    if master_params and dtype == torch.float32:
        raise ValueError("adam_: master_params are for float16/bfloat16 params only")
    for i, (p, g) in enumerate(zip(params, grads)):
        if p.device != device:
            raise ValueError(f"adam_: params[{i}] is on {p.device} but params[0] is on {device}")
        if p.dtype != dtype:
            raise TypeError(f"adam_: params[{i}] is {p.dtype} but params[0] is {dtype}; one call takes one dtype")
        if g.is_sparse:
            raise RuntimeError("adam_: sparse gradients are not supported; use torch.optim.SparseAdam")
        if g.dtype != dtype or g.device != device or g.shape != p.shape:
            raise ValueError(
                f"adam_: grads[{i}] ({g.dtype}, {g.device}, {tuple(g.shape)}) does not match its param "
                f"({dtype}, {device}, {tuple(p.shape)})"
            )
        if flat and (not _same_strides(g, p) or not (p.is_contiguous() or _dense(p))):
            raise ValueError(f"adam_: params[{i}] and grads[{i}] must be dense with identical strides")
    for i, s in enumerate(state_steps):
        # The Triton launcher increments these through their data pointers.
        if s.device.type != "cpu" or s.dtype != torch.float32 or s.numel() != 1:
            raise ValueError(f"adam_: state_steps[{i}] must be a one-element float32 CPU tensor (torch.optim's layout)")
    for name in _STATE_LISTS + (("max_exp_avg_sqs",) if amsgrad else ()) + (("master_params",) if master_params else ()):
        for i, t in enumerate(lists[name]):
            want = torch.float32 if name == "master_params" else state_dtype
            laid_out = t.shape == params[i].shape and (not flat or _same_strides(t, params[i]))
            if t.dtype != want or t.device != device or not laid_out:
                raise ValueError(f"adam_: {name}[{i}] must be a {want} tensor laid out like params[{i}] on {device}")


def _same_strides(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same flat element order: strides agree wherever the size is not 1 (a size-1 dimension's stride is free)."""
    return all(n == 1 or sa == sb for n, sa, sb in zip(a.shape, a.stride(), b.stride()))


def _dense(t: torch.Tensor) -> bool:
    """Covers every memory a kernel may treat as a flat array: channels_last params, permuted dense views."""
    if t.numel() == 0:
        return True
    order = sorted(range(t.dim()), key=lambda d: t.stride(d))
    expected = 1
    for d in order:
        if t.size(d) != 1 and t.stride(d) != expected:
            return False
        expected *= t.size(d)
    return True


def adam_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    max_exp_avg_sqs: Sequence[torch.Tensor],
    master_params: Sequence[torch.Tensor],
    state_steps: Sequence[torch.Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool = False,
    maximize: bool = False,
    decoupled_weight_decay: bool = False,
    inv_grad_scale: float = 1.0,
    backend: str | None = None,
) -> str:
    """One Adam (or AdamW, `decoupled_weight_decay=True`) step over lists of tensors, updated in place.

    All params share a device and dtype (float32/float16/bfloat16; float64 runs on the reference). State tensors are
    laid out like their params, in the param dtype, or float32 when `master_params` (float32 copies of half params)
    are given. `state_steps` are torch.optim.Adam's one-element float32 CPU counters, incremented here.
    Returns the name of the backend that ran.
    """
    args = [list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), list(max_exp_avg_sqs), list(master_params),
            list(state_steps)]
    if not args[0]:
        _check(*args, amsgrad, backend="reference")
        return "none"
    name = _backend.resolve(args[0][0].device, backend)
    if args[0][0].dtype == torch.float64:
        name = "reference"  # the fused kernels compute in fp32; float64 keeps its precision on the reference
    _check(*args, amsgrad, backend=name)
    hyper = (float(lr), float(beta1), float(beta2), float(eps), float(weight_decay), bool(amsgrad), bool(maximize),
             bool(decoupled_weight_decay), float(inv_grad_scale))
    if COMPILE_TRACES_LIST_MUTATION or not _backend.compiling():
        _IMPLS[name](*args, *hyper)
    else:
        _eager_step(name, *args, *hyper)
    return name


# torch 2.4's torch.compile cannot functionalize an op that mutates lists of tensors (fck::adam_): there a compiled
# step runs the kernels eagerly behind a graph break, and fullgraph=True needs torch >= 2.5.
COMPILE_TRACES_LIST_MUTATION = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 5)


@torch.compiler.disable
def _eager_step(name, *args):
    _IMPLS[name](*args)
