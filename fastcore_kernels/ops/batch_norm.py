"""Batch norm with an optional fused residual add and ReLU: `relu?(batch_norm(x) + residual?)`, forward and backward
on every backend.

The compiled kernels are two torch.library ops with one schema per direction — `fck::batch_norm_fwd`/`_bwd` (C++,
CPU and CUDA) and `fck::batch_norm_fwd_triton`/`_bwd_triton` — tied together by one autograd.Function. The forward
saves the input and, with a ReLU, its own output, from which the backward recovers the ReLU mask: no pre-activation
tensor is ever stored, and the output is usually kept alive anyway as the next layer's input. The reference backend
is plain PyTorch differentiated by autograd.
"""

from __future__ import annotations

import torch

from fastcore_kernels import _backend
from fastcore_kernels.ops._triton_op import triton_op
from fastcore_kernels.reference import batch_norm as reference

SUPPORTED_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)

FWD_SCHEMA = (
    "(Tensor input, Tensor? residual, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
    "Tensor(b!)? running_var, bool training, float momentum, float eps, bool relu) -> (Tensor, Tensor, Tensor)"
)
BWD_SCHEMA = (
    "(Tensor grad_output, Tensor input, Tensor? output, Tensor? weight, Tensor save_mean, Tensor save_invstd, "
    "bool training, bool relu, bool residual_grad) -> (Tensor, Tensor, Tensor, Tensor)"
)


def _fake_fwd(x, residual, weight, bias, running_mean, running_var, training, momentum, eps, relu):
    stats = x.new_empty(x.shape[1], dtype=reference.acc_dtype(x.dtype))
    return torch.empty_like(x), stats, torch.empty_like(stats)


def _fake_bwd(dy, x, y, weight, save_mean, save_invstd, training, relu, residual_grad, bias=None,
              mask_from_input=False):
    stats = torch.empty_like(save_mean)
    dres = torch.empty_like(x) if residual_grad else x.new_empty(0)
    return torch.empty_like(x), dres, stats, torch.empty_like(stats)


def register_fake() -> None:
    torch.library.register_fake("fck::batch_norm_fwd")(_fake_fwd)
    torch.library.register_fake("fck::batch_norm_bwd")(_fake_bwd)


triton_op("batch_norm_fwd_triton", "batch_norm.batch_norm_fwd", FWD_SCHEMA, _fake_fwd,
          mutates_args=("running_mean", "running_var"))
triton_op("batch_norm_bwd_triton", "batch_norm.batch_norm_bwd", BWD_SCHEMA, _fake_bwd)


# The backward as differentiable ops (reference.batch_norm_act_backward), for backwards that build a graph
# (create_graph=True); the C++ autograd node (python/register_autograd.cpp) calls it through the dispatcher.
_LIB = torch.library.Library("fck", "FRAGMENT")
_LIB.define("batch_norm_grad_graph(Tensor grad, Tensor input, Tensor? output, Tensor? weight, Tensor save_mean, "
            "Tensor save_invstd, bool training, bool relu, float eps) -> (Tensor, Tensor, Tensor, Tensor)")
_LIB.impl("batch_norm_grad_graph", reference.batch_norm_act_backward, "CompositeImplicitAutograd")


def _kernels(backend: str):
    if backend == "triton":
        return torch.ops.fck.batch_norm_fwd_triton, torch.ops.fck.batch_norm_bwd_triton
    return torch.ops.fck.batch_norm_fwd, torch.ops.fck.batch_norm_bwd  # resolve() has loaded the library


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if x.is_contiguous():
        return torch.contiguous_format
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format  # any other strides: the kernels get a contiguous copy


class _BatchNormAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, bias, running_mean, running_var, training, momentum, eps, relu, backend):
        fwd, _ = _kernels(backend)
        y, mean, invstd = fwd(x, residual, weight, bias, running_mean, running_var, training, momentum, eps, relu)
        ctx.save_for_backward(x, y if relu else None, weight, mean, invstd, bias)
        ctx.backend, ctx.training, ctx.relu, ctx.eps = backend, training, relu, eps
        ctx.mask_from_input = relu and training and residual is None
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x, y, weight, mean, invstd, bias = ctx.saved_tensors
        need = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph=True: a backward autograd can differentiate
            dx, dres, dw, db = reference.batch_norm_act_backward(dy, x, y, weight, mean, invstd, ctx.training,
                                                                 ctx.relu, ctx.eps)
            return (dx if need[0] else None, dres if need[1] else None, dw.to(weight.dtype) if need[2] else None,
                    db.to(ctx.bias_dtype) if need[3] else None, None, None, None, None, None, None, None)
        _, bwd = _kernels(ctx.backend)
        dy = dy.contiguous(memory_format=_memory_format(x))  # laid out like x, as the kernels require
        args = (dy, x, y, weight, mean, invstd, ctx.training, ctx.relu, need[1])
        if ctx.backend != "triton":  # the C++ ops may take the ReLU mask from x instead of reading y
            args += (bias, ctx.mask_from_input)
        dx, dres, dw, db = bwd(*args)
        dw = dw.to(weight.dtype) if need[2] else None
        db = db.to(ctx.bias_dtype) if need[3] else None
        return dx if need[0] else None, dres if need[1] else None, dw, db, None, None, None, None, None, None, None


def _check(x, residual, weight, bias, running_mean, running_var, training, name):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: input must be a Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name}: input must be float64, float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"{name}: expected an input of 2 to 5 dimensions (N, C, ...), got {x.dim()}-D")
    C = x.shape[1]
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"{name}: residual has shape {tuple(residual.shape)} but input has {tuple(x.shape)}")
        if residual.dtype != x.dtype or residual.device != x.device:
            raise TypeError(f"{name}: residual is {residual.dtype} on {residual.device}, "
                            f"input is {x.dtype} on {x.device}")
    for what, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight),
                    ("bias", bias)):
        if t is None:
            continue
        if t.numel() != C:
            raise RuntimeError(f"{what} should contain {C} elements not {t.numel()}")  # torch's message
        if t.dim() != 1:
            raise RuntimeError(f"{name}: {what} must be 1-D ({C} elements), got shape {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{name}: {what} is on {t.device} but input is on {x.device}")
        if not t.is_floating_point():
            raise TypeError(f"{name}: {what} must be a floating-point tensor, got {t.dtype}")
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{name}: give both running_mean and running_var, or neither")
    if not training and running_mean is None:
        raise RuntimeError("running_mean must be defined in evaluation mode")  # torch's message
    if training and x.numel() > 0 and x.numel() // C <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.shape}")


def residual_in_one_dtype(x, residual, keep=None):
    """(x, residual) in the dtype the add that batch_norm_add_relu fuses would give: `bn(x) + residual` promotes
    (keep=None), `out += residual` keeps the batch norm's dtype (keep="input"), `residual += out` the residual's
    (keep="residual"). Autocast makes such pairs: a bf16 convolution's output and a block's fp32 identity. A cast is
    differentiable, so the gradients return in each operand's own dtype."""
    if residual is None or not isinstance(residual, torch.Tensor) or not isinstance(x, torch.Tensor) \
            or residual.dtype == x.dtype or not (x.is_floating_point() and residual.is_floating_point()):
        return x, residual
    dtype = {"input": x.dtype, "residual": residual.dtype}.get(keep) or torch.result_type(x, residual)
    return x.to(dtype), residual.to(dtype)


# torch's message for a vmap over a training batch norm whose running statistics are shared by the vmapped calls
# (each would update them in place with its own batch's statistics).
_VMAP_RUNNING_STATS = (
    "Batch norm got a batched tensor as input while the running_mean or running_var, which will be updated in "
    "place, were not batched.\nIf you are using a module and do not need eval mode, please set `track_running_stats` "
    "to be False. For a model of batch norms, torch.func.replace_all_batch_norm_modules_(model) does that in place.")


def _vmapped_over_stats(x, running_mean, running_var) -> bool:
    if not _backend.transformed():
        return False
    batched = torch._C._functorch.is_batchedtensor
    return batched(x) and not (batched(running_mean) and batched(running_var))


def batch_norm_act(x, residual, running_mean, running_var, weight, bias, training, momentum, eps, relu,
                   backend=None, name="batch_norm"):
    """relu?(batch_norm(x) + residual?) on the selected backend; see fastcore_kernels.functional for the API."""
    _check(x, residual, weight, bias, running_mean, running_var, training, name)
    training, momentum, eps, relu = bool(training), float(momentum), float(eps), bool(relu)
    impl = _backend.resolve(x.device, backend)
    if impl == "reference":
        if training and running_mean is not None and _vmapped_over_stats(x, running_mean, running_var):
            raise RuntimeError(_VMAP_RUNNING_STATS)
        return reference.batch_norm_act(x, residual, running_mean, running_var, weight, bias, training, momentum,
                                        eps, relu)
    fmt = _memory_format(x)
    x = x if x.is_contiguous(memory_format=fmt) else x.contiguous()
    if residual is not None:
        residual = residual.contiguous(memory_format=fmt)  # laid out like x
    # Running statistics are updated by the kernels in place: they must be dense vectors.
    if running_mean is not None and not (running_mean.is_contiguous() and running_var.is_contiguous()):
        raise ValueError(f"{name}: running_mean and running_var must be contiguous")
    if impl in ("cpu", "cuda") and not _backend.compiling():
        # One C++ op with its autograd in C++: the Python autograd.Function below costs more than a small batch's
        # normalization. torch.compile traces the Python path.
        return torch.ops.fck.batch_norm_act(x, residual, weight, bias, running_mean, running_var, training,
                                            momentum, eps, relu)
    tensors = (x, residual, weight, bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return _BatchNormAct.apply(x, residual, weight, bias, running_mean, running_var, training, momentum, eps,
                                   relu, impl)
    fwd, _ = _kernels(impl)
    return fwd(x, residual, weight, bias, running_mean, running_var, training, momentum, eps, relu)[0]
